"""The passwords of encrypted volumes, kept as data keys under the archive's KEKs.

The local stack keeps every store that holds PHI outside the DICOM objects (Orthanc's index, the gateway's
audit outbox, PostgreSQL, Elasticsearch) on a gocryptfs volume (``deploy/local/lib.sh``). Its password is
32 random bytes (hex) kept exactly like a patient's data key: one row of ``crypto_data_key`` in the
archive's key store, wrapped by the active KEK of the archive's key provider (``local`` keyring or a
PKCS#11 token). So the provider that governs the archive governs the volume too:

- rotation: ``keys rotate`` then ``keys rewrap`` rewraps the volume's row with every other data key;
- a KEK that still wraps the volume's password cannot be destroyed (``destroy_kek`` counts it);
- destroying the row's key material (or the KEK that alone wraps it) makes the volume unopenable once it
  is unmounted: crypto-erasure of every store on it at once.

The row's ``patient_key`` is ``volume:<name>``, which is not 64 hex digits and so can never equal a patient's
HMAC: no patient shred or lookup ever reaches it. The wrapping context is the key service's own
(:func:`~compliance.crypto.keys.data_key_context`), which is what lets :meth:`KeyService.rewrap` rewrap it.

The password never goes to disk: ``python -m compliance.archive.volume password NAME`` (run by ``up`` as the
key store's owner) prints it to a pipe into gocryptfs. It is needed only to mount; gocryptfs keeps its own
master key (in ``gocryptfs.conf``, encrypted under this password) in the mounting process's memory.
"""

from __future__ import annotations

import argparse
import re
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from compliance.archive.keystore import build_provider, open_key_store
from compliance.config import Settings
from compliance.crypto.aead import new_key
from compliance.crypto.interfaces import KeyDestroyed, KeyProvider, KeyProviderError, KeyStateConflict
from compliance.crypto.keys import data_key_context
from compliance.crypto.models import CryptoDataKey, CryptoKek
from compliance.db.session import make_engine, make_session_factory

__all__ = ["VolumeKeys", "volume_key_ref"]

_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def volume_key_ref(name: str) -> str:
    """The ``patient_key`` of a volume's row: never a patient's (those are 64 hex digits)."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid volume name {name!r} (lower-case letters, digits and '-', at most 32)")
    return f"volume:{name}"


class VolumeKeys:
    def __init__(self, session_factory: sessionmaker[Session], provider: KeyProvider,
                 clock: Callable[[], datetime] = _utcnow) -> None:
        self._sessions = session_factory
        self._provider = provider
        self._clock = clock

    def password(self, name: str, *, create: bool = False) -> str:
        """The volume's password (64 hex digits); with ``create``, made under the active KEK when it has none.

        Without ``create`` a volume with no live key is an error: :class:`KeyDestroyed` when its key was
        destroyed, :class:`KeyProviderError` when it never had one.
        """
        ref = volume_key_ref(name)
        for _ in range(3):
            with self._sessions() as session:
                rows = session.scalars(select(CryptoDataKey).where(CryptoDataKey.patient_key == ref)).all()
                live = next((r for r in rows if r.destroyed_at is None), None)
                if live is not None:
                    assert live.wrapped_key is not None
                    key = self._provider.unwrap(live.kek_id, live.wrapped_key, context=data_key_context(live.id))
                    return key.hex()
                if not create:
                    if rows:
                        raise KeyDestroyed(f"the key of volume {name!r} was destroyed: the volume cannot be opened")
                    raise KeyProviderError(f"volume {name!r} has no key in the archive's key store")
                kek = session.scalars(select(CryptoKek).where(CryptoKek.state == "active")).one_or_none()
                if kek is None:
                    raise KeyProviderError("no active key-encryption key; run the key set-up")
                key_id = str(uuid.uuid4())
                key = new_key()
                wrapped = self._provider.wrap(kek.id, key, context=data_key_context(key_id))
                session.add(CryptoDataKey(id=key_id, patient_key=ref, wrapped_key=wrapped, kek_id=kek.id,
                                          created_at=self._clock()))
                try:
                    session.commit()
                except sa_exc.IntegrityError:
                    session.rollback()  # another process made it first: read theirs
                    continue
                return key.hex()
        raise KeyStateConflict(f"could not create the key of volume {name!r}")


def main(argv: list[str] | None = None) -> int:
    """``python -m compliance.archive.volume password NAME [--create]``: print the volume's password.

    Run as the owner of the archive's key store (the stack user), with the archive key settings in the
    environment (``COMPLIANCE_STACK_DIR``, ``COMPLIANCE_ARCHIVE_PATIENT_INDEX_KEY``, the provider's).
    """
    parser = argparse.ArgumentParser(prog="python -m compliance.archive.volume")
    sub = parser.add_subparsers(dest="command", required=True)
    pw = sub.add_parser("password", help="print the volume's password (a secret: pipe it, never store it)")
    pw.add_argument("name")
    pw.add_argument("--create", action="store_true", help="set up the key store and the volume's key if missing")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(volume_password(args.name, create=args.create) + "\n")
    except Exception as exc:  # noqa: BLE001 - one line for the operator, never a traceback with key state
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def volume_password(name: str, *, create: bool = False) -> str:
    """The volume's password from the archive's key store named by the environment's settings."""

    settings = Settings()
    if create:
        open_key_store(settings, create=True).close()  # key tables and a first KEK (idempotent)
    provider = build_provider(settings)
    engine = make_engine(settings.effective_archive_keys_database_url)
    try:
        return VolumeKeys(make_session_factory(engine), provider).password(name, create=create)
    finally:
        engine.dispose()
        close = getattr(provider, "close", None)
        if close is not None:
            close()


if __name__ == "__main__":
    sys.exit(main())
