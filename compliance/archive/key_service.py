"""The archive's key service on the write path: cached data keys, group-committed new ones.

:class:`ArchiveKeyService` is the :class:`~compliance.crypto.keys.KeyService` the storage plugin
uses (``open_key_store`` builds it). Same key hierarchy, same tables, same wrapping; what changes is
how often the key database and the KEK provider are asked, for every file Orthanc writes or reads:

**A bounded LRU of unwrapped data keys** (``max_cached_keys``, default 1024, about 100 KB). A hit
still asks the database whether the key is live (one primary-key lookup, 20-60 us), so a shred
takes effect at once in this process *and* in any other process sharing the key database; what the
cache saves is the unwrap (a KEK operation, an HSM round trip with ``pkcs11``) and the ORM. A shred,
rewrap, rotation or KEK destruction through this service also empties the cache (and a lookup that
raced with one does not refill it: a generation counter). Plaintext data keys are held in this
process's memory only, as the local provider's KEKs already are; they are never written anywhere.

**Key creation off the critical path, never before its commit.** A new patient's data key is
generated and wrapped in the caller's thread, and its row is committed by one committer thread that
takes every pending row at once (group commit: one durable commit, one sync of SQLite's WAL with
``synchronous=FULL``, for all the patients that arrived meanwhile). The caller gets a
:class:`PendingKey`: it may encrypt and write its object under ``pending.key`` while the commit
runs, but must call :meth:`PendingKey.wait` before it acknowledges the object. ``wait`` returns the
patient's *durably committed* key; if another process committed a key for the patient first, that
is a different key and the caller must re-encrypt under it. So the invariant holds: no object is
acknowledged before the data key it is encrypted under is durably committed. If the commit fails,
``wait`` raises and the caller removes its object. Concurrent writers for the same new patient in
this process share one pending key.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ClauseElement, Engine, bindparam, insert, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler

from compliance.crypto.aead import new_key
from compliance.crypto.interfaces import DataKeyNotFound, KeyDestroyed, KeyProvider, KeyProviderError
from compliance.crypto.keys import DataKey, KeyService, RewrapResult, data_key_context
from compliance.crypto.models import CryptoDataKey, CryptoKek
from compliance.db.base import table_of
from compliance.db.compiled import CompiledInsert

__all__ = ["ArchiveKeyService", "PendingKey"]

log = logging.getLogger(__name__)

DEFAULT_MAX_CACHED_KEYS = 1024
_BATCH_LIMIT = 256

# Built once: building and caching a statement per call costs more than running it.
_LIVE = select(CryptoDataKey.destroyed_at).where(CryptoDataKey.id == bindparam("key_id"))
_BY_ID = select(CryptoDataKey.patient_key, CryptoDataKey.kek_id, CryptoDataKey.wrapped_key,
                CryptoDataKey.destroyed_at).where(CryptoDataKey.id == bindparam("key_id"))
_LIVE_OF_PATIENT = select(CryptoDataKey.id, CryptoDataKey.kek_id, CryptoDataKey.wrapped_key).where(
    CryptoDataKey.patient_key == bindparam("patient_key"), CryptoDataKey.destroyed_at.is_(None))
_ACTIVE_KEK = select(CryptoKek.id).where(CryptoKek.state == "active")
_INSERT = insert(CryptoDataKey)
_INSERT_COLUMNS = ("id", "patient_key", "wrapped_key", "kek_id", "created_at")


class _Query:
    """A read-only Core select compiled once for the engine's dialect, run on a pooled DBAPI connection.

    The hot path runs up to three of these per stored file; going through SQLAlchemy's execution
    layer costs several times the query itself. The SQL is SQLAlchemy's own compilation (any
    dialect, any paramstyle); only the result processing is skipped, so the selected columns must be
    ones whose raw DBAPI values are used as they are (strings, bytes, and NULL checks).
    """

    def __init__(self, engine: Engine, statement: ClauseElement) -> None:
        compiled = statement.compile(dialect=engine.dialect)
        if not isinstance(compiled, SQLCompiler):  # a select compiles to SQL, never to DDL
            raise TypeError(f"not a query: {statement}")
        self._engine = engine
        self._sql = compiled.string
        self._compiled = compiled
        self._positional = compiled.positiontup

    def one(self, **params: object) -> tuple[Any, ...] | None:
        bound = self._compiled.construct_params(params)
        args: Sequence[object] | Mapping[str, object] = (
            tuple(bound[name] for name in self._positional) if self._positional is not None else bound)
        conn = self._engine.raw_connection()
        try:
            cursor = conn.cursor()
            try:
                cursor.execute(self._sql, args)
                row = cursor.fetchone()
            finally:
                cursor.close()
        finally:
            conn.close()  # back to the pool, which rolls the read transaction back
        return None if row is None else tuple(row)


class PendingKey:
    """A patient's data key to encrypt with now, and (``wait``) the key that is durably committed."""

    __slots__ = ("key", "patient_key", "kek_id", "generation", "_done", "_result", "_error")

    def __init__(self, key: DataKey, *, patient_key: str = "", kek_id: str = "", generation: int = 0,
                 committed: bool = False) -> None:
        self.key = key
        self.patient_key = patient_key
        self.kek_id = kek_id
        self.generation = generation
        self._done = threading.Event()
        self._result: DataKey | None = key if committed else None
        self._error: BaseException | None = None
        if committed:
            self._done.set()

    @classmethod
    def committed(cls, key: DataKey) -> PendingKey:
        return cls(key, committed=True)

    def wait(self, timeout: float | None = None) -> DataKey:
        """Block until the patient's key is durably committed; return it (it may differ from ``key``)."""
        if not self._done.wait(timeout):
            raise TimeoutError("the data key's commit did not finish in time")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def _resolve(self, key: DataKey) -> None:
        self._result = key
        self._done.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()


@dataclass
class _Cache:
    """LRU of unwrapped data keys by key id, with the patient index; guarded by the service's lock."""

    limit: int
    by_id: OrderedDict[str, tuple[DataKey, str]] = field(default_factory=OrderedDict)
    by_patient: dict[str, str] = field(default_factory=dict)

    def get_by_patient(self, patient_key: str) -> DataKey | None:
        key_id = self.by_patient.get(patient_key)
        return None if key_id is None else self.get_by_id(key_id)

    def get_by_id(self, key_id: str) -> DataKey | None:
        entry = self.by_id.get(key_id)
        if entry is None:
            return None
        self.by_id.move_to_end(key_id)
        return entry[0]

    def put(self, key: DataKey, patient_key: str) -> None:
        self.by_id[key.key_id] = (key, patient_key)
        self.by_id.move_to_end(key.key_id)
        self.by_patient[patient_key] = key.key_id
        while len(self.by_id) > self.limit:
            old_id, (_, old_patient) = self.by_id.popitem(last=False)
            if self.by_patient.get(old_patient) == old_id:
                del self.by_patient[old_patient]

    def drop(self, key_id: str) -> None:
        entry = self.by_id.pop(key_id, None)
        if entry is not None and self.by_patient.get(entry[1]) == key_id:
            del self.by_patient[entry[1]]

    def drop_patient(self, patient_key: str) -> None:
        key_id = self.by_patient.pop(patient_key, None)
        if key_id is not None:
            self.by_id.pop(key_id, None)
        for other_id in [k for k, (_, p) in self.by_id.items() if p == patient_key]:
            del self.by_id[other_id]

    def clear(self) -> None:
        self.by_id.clear()
        self.by_patient.clear()

    def __len__(self) -> int:
        return len(self.by_id)


class ArchiveKeyService(KeyService):
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        provider: KeyProvider,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        *,
        patient_index_key: bytes,
        engine: Engine,
        max_cached_keys: int = DEFAULT_MAX_CACHED_KEYS,
    ) -> None:
        super().__init__(session_factory, provider, clock, patient_index_key=patient_index_key)
        if max_cached_keys < 1:
            raise ValueError("max_cached_keys must be at least 1")
        self._engine = engine
        self._q_live = _Query(engine, _LIVE)
        self._q_by_id = _Query(engine, _BY_ID)
        self._q_live_of_patient = _Query(engine, _LIVE_OF_PATIENT)
        self._insert_rows = CompiledInsert(engine, table_of(CryptoDataKey), _INSERT_COLUMNS)
        self._q_active_kek = _Query(engine, _ACTIVE_KEK)
        self._lock = threading.Lock()
        self._cache = _Cache(max_cached_keys)
        self._pending: dict[str, PendingKey] = {}
        self._generation = 0
        self._queue: queue.SimpleQueue[PendingKey | None] = queue.SimpleQueue()
        self._committer: threading.Thread | None = None
        self._closed = False

    # --- the write path ----------------------------------------------------------------------

    def key_for_patient(self, patient_id: str) -> PendingKey:
        """The patient's data key: live (cached or from the database) or new, its commit pending."""
        patient_key = self.patient_key(patient_id)
        with self._lock:
            pending = self._pending.get(patient_key)
            if pending is not None:
                return pending
            cached = self._cache.get_by_patient(patient_key)
            generation = self._generation
        if cached is not None:
            if self._is_live(cached.key_id):
                return PendingKey.committed(cached)
            self._forget(cached.key_id)
            generation = self._current_generation()
        live = self._live_key_of(patient_key)
        if live is not None:
            self._remember(live, patient_key, generation)
            return PendingKey.committed(live)
        return self._new_key(patient_key, generation)

    def data_key_for_patient(self, patient_id: str) -> DataKey:
        """As :meth:`KeyService.data_key_for_patient`: the patient's live key, committed on return."""
        return self.key_for_patient(patient_id).wait()

    def data_key_by_id(self, key_id: str) -> bytes:
        with self._lock:
            cached = self._cache.get_by_id(key_id)
            generation = self._generation
        if cached is not None:
            if self._is_live(key_id):
                return cached.data_key
            self._forget(key_id)
            generation = self._current_generation()
        row = self._q_by_id.one(key_id=key_id)
        if row is None:
            raise DataKeyNotFound("no such data key")
        patient_key, kek_id, wrapped, destroyed_at = row
        if destroyed_at is not None or wrapped is None:
            raise KeyDestroyed("the data was permanently erased")
        wrapped = bytes(wrapped)
        key = DataKey(key_id, self._provider.unwrap(kek_id, wrapped, context=data_key_context(key_id)), wrapped)
        self._remember(key, patient_key, generation)
        return key.data_key

    # --- operator operations: the cache never outlives them ------------------------------------

    def shred_patient(self, patient_id: str, study_uids: Sequence[str] = ()) -> int:
        patient_key = self.patient_key(patient_id)
        self._invalidate(patient_key)
        try:
            return super().shred_patient(patient_id, study_uids)
        finally:
            self._invalidate(patient_key)

    def rewrap(self) -> RewrapResult:
        try:
            return super().rewrap()
        finally:
            self._invalidate()

    def rotate(self) -> str:
        try:
            return super().rotate()
        finally:
            self._invalidate()

    def destroy_kek(self, kek_id: str) -> None:
        self._invalidate()
        try:
            super().destroy_kek(kek_id)
        finally:
            self._invalidate()

    def close(self) -> None:
        """Stop the committer after the rows already queued are committed."""
        with self._lock:
            self._closed = True
            committer = self._committer
        if committer is not None:
            self._queue.put(None)
            committer.join(timeout=60)

    @property
    def cached_keys(self) -> int:
        with self._lock:
            return len(self._cache)

    # --- internals --------------------------------------------------------------------------

    def _current_generation(self) -> int:
        with self._lock:
            return self._generation

    def _invalidate(self, patient_key: str | None = None) -> None:
        with self._lock:
            self._generation += 1
            if patient_key is None:
                self._cache.clear()
                self._pending.clear()
            else:
                self._cache.drop_patient(patient_key)
                self._pending.pop(patient_key, None)

    def _forget(self, key_id: str) -> None:
        with self._lock:
            self._cache.drop(key_id)

    def _remember(self, key: DataKey, patient_key: str, generation: int) -> None:
        with self._lock:
            # A shred (or rewrap...) that began after this lookup began wins: do not cache.
            if generation == self._generation:
                self._cache.put(key, patient_key)

    def _is_live(self, key_id: str) -> bool:
        row = self._q_live.one(key_id=key_id)
        return row is not None and row[0] is None

    def _live_key_of(self, patient_key: str) -> DataKey | None:
        row = self._q_live_of_patient.one(patient_key=patient_key)
        if row is None:
            return None
        key_id, kek_id, wrapped = row[0], row[1], bytes(row[2])
        data_key = self._provider.unwrap(kek_id, wrapped, context=data_key_context(key_id))
        return DataKey(key_id, data_key, wrapped)

    def _new_key(self, patient_key: str, generation: int) -> PendingKey:
        row = self._q_active_kek.one()
        kek_id = None if row is None else row[0]
        if kek_id is None:
            raise KeyProviderError("no active key-encryption key; run the key set-up (rotate)")
        key_id = str(uuid.uuid4())
        data_key = new_key()
        wrapped = self._provider.wrap(kek_id, data_key, context=data_key_context(key_id))
        pending = PendingKey(DataKey(key_id, data_key, wrapped), patient_key=patient_key, kek_id=kek_id,
                             generation=generation)
        with self._lock:
            if self._closed:
                raise KeyProviderError("the archive's key service is closed")
            other = self._pending.get(patient_key)
            if other is not None:  # another thread got there first: share its key
                return other
            self._pending[patient_key] = pending
            if self._committer is None:
                self._committer = threading.Thread(target=self._commit_loop, name="archive-key-committer",
                                                   daemon=True)
                self._committer.start()
            # queued under the lock: close() marks the end of the queue under it too, so a key is
            # either queued before that mark (and committed) or refused, never left waiting forever
            self._queue.put(pending)
        return pending

    def _commit_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < _BATCH_LIMIT:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: Sequence[PendingKey]) -> None:
        try:
            results = self._insert(batch)
        except BaseException as exc:  # noqa: BLE001 - every waiter gets the failure
            log.error("data key commit failed for %d key(s): %s", len(batch), type(exc).__name__)
            with self._lock:
                for p in batch:
                    if self._pending.get(p.patient_key) is p:
                        del self._pending[p.patient_key]
            for p in batch:
                p._fail(exc)  # noqa: SLF001
            return
        with self._lock:
            for p, key in zip(batch, results, strict=True):
                if self._pending.get(p.patient_key) is p:
                    del self._pending[p.patient_key]
                if p.generation == self._generation:
                    self._cache.put(key, p.patient_key)
        for p, key in zip(batch, results, strict=True):
            p._resolve(key)  # noqa: SLF001

    def _row(self, p: PendingKey) -> dict[str, object]:
        return {"id": p.key.key_id, "patient_key": p.patient_key, "wrapped_key": p.key.wrapped,
                "kek_id": p.kek_id, "created_at": self._clock()}

    def _insert(self, batch: Sequence[PendingKey]) -> list[DataKey]:
        """Commit the batch's rows durably in one transaction; return each patient's committed key.

        The INSERT is compiled once (``CompiledInsert``) and run as driver SQL: compiling and
        caching the statement each time cost more CPU than SQLite's own insert, once per new
        patient, in the archive's write path.
        """
        rows = [self._insert_rows.params(self._row(p)) for p in batch]
        try:
            with self._engine.begin() as conn:
                conn.exec_driver_sql(self._insert_rows.sql, rows)
            return [p.key for p in batch]
        except sa_exc.IntegrityError:
            pass  # a patient got a live key from another process meanwhile: one row at a time
        results = []
        for p in batch:
            try:
                with self._engine.begin() as tx:
                    tx.execute(_INSERT, [self._row(p)])
                results.append(p.key)
            except sa_exc.IntegrityError:
                winner = self._live_key_of(p.patient_key)
                if winner is None:
                    raise
                results.append(winner)
        return results
