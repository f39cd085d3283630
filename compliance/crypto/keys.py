"""The key service: per-patient data keys, KEK rotation, rewrap and shredding.

Data keys are AES-256, one live key per patient, created on first use under the active KEK and
stored wrapped in ``crypto_data_key`` (:mod:`compliance.crypto.models`). Operations for operators
(the CLI/API layer wires them and audits each one):

- :meth:`KeyService.status`: KEKs, their state and how many live data keys each wraps;
- :meth:`KeyService.rotate`: a new active KEK; new data keys are wrapped by it, older ones stay
  readable under their retired KEK;
- :meth:`KeyService.rewrap`: every live data key rewrapped under the active KEK (objects untouched);
  afterwards retired KEKs wrap nothing and :meth:`KeyService.destroy_kek` can remove them;
- :meth:`KeyService.shred_patient`: the patient's data key destroyed; its objects can never be
  decrypted again (see the backup caveat in :mod:`compliance.crypto.models`).

Unwrapped data keys are not cached: each is plaintext in memory only for the call that needs it,
and a shred takes effect in every process at once. (Python cannot reliably zero ``bytes``.)
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from compliance.crypto.aead import new_key
from compliance.crypto.interfaces import (
    DataKeyNotFound,
    KeyDestroyed,
    KeyProvider,
    KeyProviderError,
    KeyStateConflict,
)
from compliance.crypto.models import CryptoDataKey, CryptoErasedStudy, CryptoKek
from compliance.crypto.streaming import Header
from compliance.db.session import rows_matched

__all__ = ["DataKey", "KekStatus", "KeyService", "KeyStatus", "RewrapResult", "data_key_context"]

_REWRAP_BATCH = 500


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class DataKey:
    key_id: str
    data_key: bytes
    wrapped: bytes

    def __repr__(self) -> str:  # never print key material
        return f"DataKey(key_id={self.key_id!r})"


@dataclass(frozen=True)
class KekStatus:
    id: str
    provider: str
    state: str
    created_at: datetime
    retired_at: datetime | None
    destroyed_at: datetime | None
    #: Live (not shredded) data keys currently wrapped by this KEK.
    data_keys: int
    #: Whether the provider still holds the key material.
    in_provider: bool


@dataclass(frozen=True)
class KeyStatus:
    provider: Mapping[str, Any]
    keks: tuple[KekStatus, ...]
    live_data_keys: int
    shredded_data_keys: int


@dataclass(frozen=True)
class RewrapResult:
    rewrapped: int
    already_current: int
    active_kek_id: str


def data_key_context(key_id: str) -> bytes:
    """The context a data key is wrapped under by its KEK: bound to the key's row id, so a wrapped key
    moved to another row does not unwrap. Every row of ``crypto_data_key`` uses it (rewrap relies on it)."""
    return b"data key " + key_id.encode()


class KeyService:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        provider: KeyProvider,
        clock: Callable[[], datetime] = _utcnow,
        *,
        patient_index_key: bytes,
    ) -> None:
        """``patient_index_key`` keys the HMAC that turns patient ids into ``patient_key`` values.

        It is a secret kept outside the database (settings or the secret store) and must be backed
        up with the keyring: without it :meth:`shred_patient` cannot find existing keys.
        """
        if len(patient_index_key) < 32:
            raise ValueError("patient_index_key must be at least 32 bytes")
        self._sessions = session_factory
        self._provider = provider
        self._clock = clock
        self._index_key = patient_index_key

    def patient_key(self, patient_id: str) -> str:
        return hmac.new(self._index_key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()

    def study_key(self, study_uid: str) -> str:
        """The tombstone key of an erased study (its own domain, so it never equals a patient key)."""
        return hmac.new(self._index_key, b"study:" + study_uid.encode("utf-8"), hashlib.sha256).hexdigest()

    def study_erased(self, study_uid: str) -> bool:
        """Whether a shred left a tombstone for this study (:class:`CryptoErasedStudy`)."""
        with self._sessions() as session:
            return session.get(CryptoErasedStudy, self.study_key(study_uid)) is not None

    def _active_kek(self, session: Session) -> CryptoKek:
        kek = session.scalars(select(CryptoKek).where(CryptoKek.state == "active")).one_or_none()
        if kek is None:
            raise KeyProviderError("no active key-encryption key; run the key set-up (rotate)")
        return kek

    # --- data keys --------------------------------------------------------------------------------

    def data_key_for_patient(self, patient_id: str) -> DataKey:
        """The patient's live data key, created under the active KEK on first use."""
        patient_key = self.patient_key(patient_id)
        for _ in range(3):
            with self._sessions() as session:
                row = session.scalars(
                    select(CryptoDataKey).where(
                        CryptoDataKey.patient_key == patient_key, CryptoDataKey.destroyed_at.is_(None)
                    )
                ).one_or_none()
                if row is not None:
                    assert row.wrapped_key is not None
                    key = self._provider.unwrap(row.kek_id, row.wrapped_key, context=data_key_context(row.id))
                    return DataKey(row.id, key, row.wrapped_key)
                kek = self._active_kek(session)
                key_id = str(uuid.uuid4())
                data_key = new_key()
                wrapped = self._provider.wrap(kek.id, data_key, context=data_key_context(key_id))
                session.add(
                    CryptoDataKey(
                        id=key_id,
                        patient_key=patient_key,
                        wrapped_key=wrapped,
                        kek_id=kek.id,
                        created_at=self._clock(),
                    )
                )
                try:
                    session.commit()
                except sa_exc.IntegrityError:
                    # Another process created the patient's key first: use theirs.
                    session.rollback()
                    continue
                return DataKey(key_id, data_key, wrapped)
        raise KeyStateConflict("could not create the patient's data key")

    def data_key_by_id(self, key_id: str) -> bytes:
        """Unwrap data key ``key_id``; :class:`KeyDestroyed` once it was shredded."""
        with self._sessions() as session:
            row = session.get(CryptoDataKey, key_id)
            if row is None:
                raise DataKeyNotFound("no such data key")
            if row.destroyed_at is not None or row.wrapped_key is None:
                raise KeyDestroyed("the data was permanently erased")
            kek_id, wrapped = row.kek_id, row.wrapped_key
        return self._provider.unwrap(kek_id, wrapped, context=data_key_context(key_id))

    def unwrap_for_header(self, header: Header) -> bytes:
        """The ``unwrap`` callback for :func:`compliance.crypto.streaming.decrypt_stream`."""
        return self.data_key_by_id(header.key_id)

    # --- operator operations ---------------------------------------------------------------------

    def status(self) -> KeyStatus:
        in_provider = set(self._provider.kek_ids())
        with self._sessions() as session:
            counts: dict[str, int] = {
                kek_id: count
                for kek_id, count in session.execute(
                    select(CryptoDataKey.kek_id, func.count())
                    .where(CryptoDataKey.destroyed_at.is_(None))
                    .group_by(CryptoDataKey.kek_id)
                )
            }
            shredded = session.scalar(
                select(func.count()).select_from(CryptoDataKey).where(CryptoDataKey.destroyed_at.is_not(None))
            )
            keks = tuple(
                KekStatus(
                    id=k.id,
                    provider=k.provider,
                    state=k.state,
                    created_at=k.created_at,
                    retired_at=k.retired_at,
                    destroyed_at=k.destroyed_at,
                    data_keys=counts.get(k.id, 0),
                    in_provider=k.id in in_provider,
                )
                for k in session.scalars(select(CryptoKek).order_by(CryptoKek.created_at, CryptoKek.id))
            )
        return KeyStatus(
            provider=self._provider.describe(),
            keks=keks,
            live_data_keys=sum(counts.values()),
            shredded_data_keys=shredded or 0,
        )

    def rotate(self) -> str:
        """Create a new active KEK (the first one at set-up); the previous active one is retired."""
        kek_id = self._provider.create_kek()
        now = self._clock()
        with self._sessions() as session, session.begin():
            session.execute(
                update(CryptoKek).where(CryptoKek.state == "active").values(state="retired", retired_at=now)
            )
            # The retire must reach the database before the insert, or the one-active index trips.
            session.flush()
            session.add(CryptoKek(id=kek_id, provider=self._provider.name, state="active", created_at=now))
        return kek_id

    def rewrap(self) -> RewrapResult:
        """Rewrap every live data key under the active KEK, in batches; objects are not touched."""
        rewrapped = 0
        with self._sessions() as session:
            active = self._active_kek(session).id
            current = session.scalar(
                select(func.count())
                .select_from(CryptoDataKey)
                .where(CryptoDataKey.destroyed_at.is_(None), CryptoDataKey.kek_id == active)
            )
        while True:
            with self._sessions() as session, session.begin():
                rows = session.scalars(
                    select(CryptoDataKey)
                    .where(CryptoDataKey.destroyed_at.is_(None), CryptoDataKey.kek_id != active)
                    .limit(_REWRAP_BATCH)
                ).all()
                if not rows:
                    break
                now = self._clock()
                for row in rows:
                    assert row.wrapped_key is not None
                    context = data_key_context(row.id)
                    data_key = self._provider.unwrap(row.kek_id, row.wrapped_key, context=context)
                    row.wrapped_key = self._provider.wrap(active, data_key, context=context)
                    row.kek_id = active
                    row.rewrapped_at = now
                rewrapped += len(rows)
        return RewrapResult(rewrapped=rewrapped, already_current=current or 0, active_kek_id=active)

    def confirm_kek_retired(self, kek_id: str) -> None:
        """Confirm that ``kek_id`` is retired; change nothing. A KEK is retired only by :meth:`rotate`
        (the previous active one), so this raises for the active KEK (409), a destroyed one (409) or
        an unknown id (404). Serves the operator's ``keys retire`` (CLI and API)."""
        with self._sessions() as session, session.begin():
            kek = session.get(CryptoKek, kek_id)
            if kek is None:
                raise DataKeyNotFound(f"no KEK {kek_id}")
            if kek.state == "active":
                raise KeyStateConflict("the active KEK is retired by rotating to a new one")
            if kek.state == "destroyed":
                raise KeyStateConflict(f"KEK {kek_id} is already destroyed")

    def destroy_kek(self, kek_id: str) -> None:
        """Destroy a retired KEK that wraps no live data key (run :meth:`rewrap` first)."""
        with self._sessions() as session, session.begin():
            kek = session.get(CryptoKek, kek_id)
            if kek is None:
                raise DataKeyNotFound(f"no KEK {kek_id}")
            if kek.state == "active":
                raise KeyStateConflict("the active KEK cannot be destroyed; rotate first")
            if kek.state == "destroyed":
                return
            live = session.scalar(
                select(func.count())
                .select_from(CryptoDataKey)
                .where(CryptoDataKey.kek_id == kek_id, CryptoDataKey.destroyed_at.is_(None))
            )
            if live:
                raise KeyStateConflict(
                    f"KEK {kek_id} still wraps {live} live data keys; rewrap first",
                    detail={"live_data_keys": live},
                )
            # Mark first, then destroy: if the provider fails the transaction rolls back, and a KEK
            # row never claims "destroyed" while the key material survives.
            kek.state = "destroyed"
            kek.destroyed_at = self._clock()
            kek.retired_at = kek.retired_at or kek.destroyed_at
            session.flush()
            if kek_id in self._provider.kek_ids():
                self._provider.destroy_kek(kek_id)

    def shred_patient(self, patient_id: str, study_uids: Sequence[str] = ()) -> int:
        """Destroy the patient's data key(s); return how many were destroyed (0: none known).

        ``study_uids`` (the patient's studies in the archive's index) get a tombstone in the same
        transaction, so the studies still read as erased once they leave the index.
        """
        patient_key = self.patient_key(patient_id)
        with self._sessions() as session, session.begin():
            if session.get_bind().dialect.name == "sqlite":
                # Overwrite the freed bytes in the database file instead of leaving them in free pages.
                session.execute(text("PRAGMA secure_delete = ON"))
            now = self._clock()
            result = session.execute(
                update(CryptoDataKey)
                .where(CryptoDataKey.patient_key == patient_key, CryptoDataKey.destroyed_at.is_(None))
                .values(wrapped_key=None, destroyed_at=now)
            )
            for study_key in {self.study_key(uid) for uid in study_uids}:
                if session.get(CryptoErasedStudy, study_key) is None:
                    session.add(CryptoErasedStudy(study_key=study_key, patient_key=patient_key, erased_at=now))
            return rows_matched(result)
