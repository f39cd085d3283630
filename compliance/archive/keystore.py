"""The archive's key store: KEK provider + key metadata database + patient index key.

Key custody (read with :mod:`compliance.archive.orthanc_plugin`): the *archive process* (Orthanc
with the storage plugin) is the one custodian of the archive's keys. It opens the key provider and
the key database itself, as the archive's operating-system user:

- ``local`` provider: the keyring ``{stack_dir}/archive-keys/keyring.json`` (mode 0600, directory
  0700, owned by the archive's user; :class:`LocalKeyProvider` refuses anything looser). It is not
  inside Orthanc's storage directory, so a copy of the storage (a backup, a stolen disk image of
  the data volume) never carries the KEKs.
- ``pkcs11`` provider: KEKs inside a token (SoftHSM2 or an HSM); the process authenticates with the
  token's user PIN (``COMPLIANCE_ARCHIVE_PKCS11_PIN``, passed by environment, never written into
  the storage directory or the Orthanc configuration).
- key metadata (wrapped data keys): its own database, by default SQLite
  ``{stack_dir}/archive-keys/keys.db`` beside the keyring (``COMPLIANCE_ARCHIVE_KEYS_DATABASE_URL``
  may point at PostgreSQL). It is deliberately not the gateway's database: gateways come and go
  (the test suite starts its own with fresh databases), the archive's keys must not.
- the patient index key (HMAC of patient ids in the key table) comes from
  ``COMPLIANCE_ARCHIVE_PATIENT_INDEX_KEY`` (hex, 32 bytes, generated once by ``deploy/local/up``
  into the stack's ``secrets.env``, mode 0600, and passed to Orthanc by environment).

No plaintext data key is ever written anywhere. The key service is
:class:`compliance.archive.key_service.ArchiveKeyService`: unwrapped data keys are kept in this
process's memory in a bounded LRU (each use still checks the key is live, so a shred takes effect
at once), and new data keys are group-committed, durably, before any object under them is
acknowledged.
"""

from __future__ import annotations

import binascii
import os
from dataclasses import dataclass

from sqlalchemy import Engine

from compliance.archive.key_service import ArchiveKeyService
from compliance.config import Settings
from compliance.crypto.interfaces import KeyProvider
from compliance.crypto.models import CryptoDataKey, CryptoErasedStudy, CryptoKek
from compliance.db.base import Base, table_of
from compliance.db.session import make_engine, make_session_factory
from compliance.errors import ConfigurationError

__all__ = ["ArchiveKeyStore", "build_provider", "open_key_store", "patient_index_key"]


def patient_index_key(settings: Settings) -> bytes:
    raw = settings.archive_patient_index_key.get_secret_value().strip()
    if not raw:
        raise ConfigurationError("COMPLIANCE_ARCHIVE_PATIENT_INDEX_KEY is not set (deploy/local/up generates it)")
    try:
        key = binascii.unhexlify(raw)
    except binascii.Error as exc:
        raise ConfigurationError("COMPLIANCE_ARCHIVE_PATIENT_INDEX_KEY must be hex") from exc
    if len(key) < 32:
        raise ConfigurationError("COMPLIANCE_ARCHIVE_PATIENT_INDEX_KEY must be at least 32 bytes (64 hex digits)")
    return key


def build_provider(settings: Settings, *, create_if_missing: bool = False) -> KeyProvider:
    if settings.archive_key_provider == "pkcs11":
        from compliance.crypto.providers.pkcs11 import Pkcs11KeyProvider, find_softhsm2_module

        module = settings.archive_pkcs11_module or find_softhsm2_module()
        if not module:
            raise ConfigurationError("COMPLIANCE_ARCHIVE_PKCS11_MODULE is not set and SoftHSM2 is not installed")
        pin = settings.archive_pkcs11_pin.get_secret_value()
        if not pin:
            raise ConfigurationError("COMPLIANCE_ARCHIVE_PKCS11_PIN is not set")
        return Pkcs11KeyProvider(module, settings.archive_pkcs11_token_label, pin)
    from compliance.crypto.providers.local import LocalKeyProvider

    keyring = settings.effective_archive_keyring_file
    if create_if_missing:
        keyring.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return LocalKeyProvider(
        keyring,
        environment=settings.environment,
        explicit_path=settings.archive_keyring_file is not None,
        create_if_missing=create_if_missing,
    )


@dataclass
class ArchiveKeyStore:
    keys: ArchiveKeyService
    provider: KeyProvider
    engine: Engine

    def close(self) -> None:
        self.keys.close()
        close = getattr(self.provider, "close", None)
        if close is not None:
            close()
        self.engine.dispose()


def open_key_store(settings: Settings, *, create: bool = False) -> ArchiveKeyStore:
    """Open the archive's key store; with ``create`` (set-up), create what is missing and a first KEK."""
    url = settings.effective_archive_keys_database_url
    if create and url.startswith("sqlite:///"):
        settings.archive_keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    provider = build_provider(settings, create_if_missing=create)
    engine = make_engine(url)
    if create:
        Base.metadata.create_all(engine, tables=[table_of(CryptoKek), table_of(CryptoDataKey),
                                                 table_of(CryptoErasedStudy)])
    else:
        # Key stores set up before shreds left tombstones gain the table on first open.
        Base.metadata.create_all(engine, tables=[table_of(CryptoErasedStudy)])
        if url.startswith("sqlite:///"):
            db = url.removeprefix("sqlite:///")
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(db + suffix):
                    os.chmod(db + suffix, 0o600)
    keys = ArchiveKeyService(make_session_factory(engine), provider, patient_index_key=patient_index_key(settings),
                             engine=engine)
    store = ArchiveKeyStore(keys, provider, engine)
    if create and not any(k.state == "active" for k in keys.status().keks):
        keys.rotate()
    return store
