"""AES-256-GCM for small values (NIST SP 800-38D), the one place outside the streaming format
(:mod:`compliance.crypto.streaming`) and the key providers' wrapping where the package calls AES-GCM.

    sealed = nonce (12, random) || ciphertext || tag (16)

Used for the pseudonym map's originals and the sealed disclosure lists of the export domain. A random
96-bit nonce per call is safe well past the number of values one key seals here (SP 800-38D 8.3 bounds
random nonces at 2^32 invocations per key).
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from compliance.crypto.interfaces import DecryptionError

NONCE_BYTES = 12
KEY_BYTES = 32


def new_key() -> bytes:
    """A fresh 256-bit AES key from the operating system's CSPRNG."""
    return AESGCM.generate_key(bit_length=KEY_BYTES * 8)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """The plaintext, or :class:`DecryptionError` for a wrong key, a wrong ``aad`` or altered bytes."""
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except (InvalidTag, ValueError):
        raise DecryptionError() from None
