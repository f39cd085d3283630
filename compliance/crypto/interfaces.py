"""Crypto contracts: where key-encryption keys live, and the crypto domain's errors.

The key hierarchy has three levels (the byte format is in :mod:`compliance.crypto.streaming`):

    KEK (key-encryption key)     lives in a :class:`KeyProvider` (a keyring file, or a PKCS#11 token
        │                        where it never leaves the token); one is active, older ones are retired
        │ wraps
    data key (one per patient)   AES-256, stored wrapped in ``crypto_data_key`` (compliance/crypto/models.py);
        │                        shredding a patient destroys this key
        │ wraps
    content key (one per object) AES-256, stored wrapped in the object's own header

Rotation and rewrap touch only the middle level's wrapping (database rows), never the objects;
shredding one data key makes every object of that patient undecryptable.

    ComplianceError
    ├── Gone
    │   └── KeyDestroyed             the patient's data key was shredded (erasure is permanent)  -> 410
    ├── NotFound
    │   └── DataKeyNotFound          no data key with that id                                     -> 404
    ├── Conflict
    │   └── KeyStateConflict         e.g. destroying a KEK that still wraps live data keys        -> 409
    ├── UpstreamError
    │   └── KeyProviderError         the key provider (keyring, HSM) failed or lacks a KEK         -> 502
    └── IntegrityError
        └── DecryptionError          THE opaque error: anything that fails to decrypt/authenticate -> 500
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from compliance.errors import Conflict, Gone, IntegrityError, NotFound, UpstreamError

__all__ = [
    "DataKeyNotFound",
    "DecryptionError",
    "KeyDestroyed",
    "KeyProvider",
    "KeyProviderError",
    "KeyStateConflict",
]

#: The single message of every :class:`DecryptionError`; it says nothing about which check failed.
DECRYPTION_FAILED = "the object could not be decrypted"


class DecryptionError(IntegrityError):
    """Stored data failed to decrypt or authenticate.

    Raised for every such failure (bad header, wrong key, a modified, reordered, truncated or
    extended segment, wrong associated data) with the same message and no detail, so the error
    cannot be used as an oracle. It is always raised ``from None``.
    """

    code = "decryption_failed"

    def __init__(self, message: str = DECRYPTION_FAILED) -> None:
        # The message is fixed on purpose; the argument exists only for the base-class signature.
        super().__init__(DECRYPTION_FAILED)


class KeyDestroyed(Gone):
    """The data key was shredded: the patient's objects can never be decrypted again."""

    code = "key_destroyed"


class DataKeyNotFound(NotFound):
    code = "data_key_not_found"


class KeyStateConflict(Conflict):
    code = "key_state_conflict"


class KeyProviderError(UpstreamError):
    """The key provider failed (unreachable token, unreadable keyring, unknown KEK)."""

    code = "key_provider_error"


@runtime_checkable
class KeyProvider(Protocol):
    """Holds key-encryption keys and wraps/unwraps data keys with them.

    A provider never hands out a KEK. ``context`` is bound to the wrapping as associated data (the
    key service passes the data key's id), so a wrapped key moved to another row does not unwrap.
    ``unwrap`` raises :class:`DecryptionError` when the wrapped bytes do not authenticate and
    :class:`KeyProviderError` when the provider itself fails or does not hold ``kek_id``.
    """

    #: Short name stored with each KEK's metadata ("local", "pkcs11").
    name: str

    def kek_ids(self) -> list[str]:
        """Ids of the KEKs the provider currently holds."""
        ...

    def create_kek(self) -> str:
        """Generate a new KEK inside the provider and return its id."""
        ...

    def wrap(self, kek_id: str, data_key: bytes, *, context: bytes) -> bytes: ...

    def unwrap(self, kek_id: str, wrapped: bytes, *, context: bytes) -> bytes: ...

    def destroy_kek(self, kek_id: str) -> None:
        """Delete the KEK from the provider; everything it alone wraps becomes unreadable."""
        ...

    def describe(self) -> Mapping[str, Any]:
        """Non-secret facts for ``keys status`` (provider, location, KEK ids)."""
        ...
