"""crypto domain: encryption at rest for archive objects.

- :mod:`compliance.crypto.streaming`: the encrypted object format (documented there, byte by byte)
  and streaming encrypt/decrypt;
- :mod:`compliance.crypto.keys`: per-patient data keys, rotation, rewrap, shredding;
- :mod:`compliance.crypto.providers`: where key-encryption keys live (``local``, ``pkcs11``);
- :mod:`compliance.crypto.interfaces`: the provider contract and the domain's errors.
"""

from compliance.crypto.interfaces import (
    DataKeyNotFound,
    DecryptionError,
    KeyDestroyed,
    KeyProvider,
    KeyProviderError,
    KeyStateConflict,
)
from compliance.crypto.streaming import (
    Header,
    decrypt_stream,
    encrypt_stream,
    iter_decrypt,
    iter_encrypt,
    read_header,
)

__all__ = [
    "DataKeyNotFound",
    "DecryptionError",
    "Header",
    "KeyDestroyed",
    "KeyProvider",
    "KeyProviderError",
    "KeyStateConflict",
    "decrypt_stream",
    "encrypt_stream",
    "iter_decrypt",
    "iter_encrypt",
    "read_header",
]
