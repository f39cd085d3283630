"""ArchiveKeyService: the bounded key cache, its invalidation, and the group-committed new keys.

Real SQLite key database (WAL, synchronous=FULL, as deployed) and a real local keyring; the only
instrumentation is a counting provider and SQLAlchemy events that hold or fail a commit.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from compliance.archive.key_service import ArchiveKeyService, PendingKey
from compliance.archive.keystore import open_key_store
from compliance.archive.storage import EncryptedFilesystemStorage
from compliance.config import Settings
from compliance.crypto.interfaces import KeyDestroyed
from compliance.crypto.keys import KeyService
from compliance.crypto.streaming import read_header
from compliance.db.session import make_session_factory

from .test_encrypted_storage import dicom

INDEX_KEY = "ab" * 32


class CountingProvider:
    """The real provider, counting unwraps (a cache hit does not unwrap)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.unwraps = 0
        self.on_unwrap: Any = None

    def unwrap(self, kek_id: str, wrapped: bytes, *, context: bytes) -> bytes:
        self.unwraps += 1
        if self.on_unwrap is not None:
            hook, self.on_unwrap = self.on_unwrap, None
            hook()
        return self._inner.unwrap(kek_id, wrapped, context=context)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(stack_dir=tmp_path / "stack", archive_patient_index_key=INDEX_KEY)


@pytest.fixture
def store(settings: Settings):
    s = open_key_store(settings, create=True)
    yield s
    s.close()


def service(store, *, max_cached_keys: int = 1024) -> tuple[ArchiveKeyService, CountingProvider]:
    provider = CountingProvider(store.provider)
    keys = ArchiveKeyService(make_session_factory(store.engine), provider,  # type: ignore[arg-type]
                             patient_index_key=bytes.fromhex(INDEX_KEY), engine=store.engine,
                             max_cached_keys=max_cached_keys)
    return keys, provider


@pytest.fixture
def keys(store) -> Iterator[tuple[ArchiveKeyService, CountingProvider]]:
    k = service(store)
    yield k
    k[0].close()


def rows(settings: Settings, sql: str, *args: object) -> list[tuple]:
    """Read the key database from outside (another connection: only what is committed)."""
    with closing(sqlite3.connect(settings.archive_keys_dir / "keys.db")) as db:
        return db.execute(sql, args).fetchall()


@contextmanager
def held_commits(store) -> Iterator[threading.Event]:
    """Hold every commit on the key database until the yielded event is set (``.held``: one is held)."""
    release = threading.Event()
    release.held = threading.Event()  # type: ignore[attr-defined]

    def hold(conn: Any) -> None:
        release.held.set()  # type: ignore[attr-defined]
        assert release.wait(30)

    event.listen(store.engine, "commit", hold)
    try:
        yield release
    finally:
        release.set()
        event.remove(store.engine, "commit", hold)


# --- the cache ----------------------------------------------------------------------------------

def test_a_cached_key_is_not_unwrapped_again(keys):
    service_, provider = keys
    key = service_.data_key_for_patient("P1")
    before = provider.unwraps
    for _ in range(5):
        assert service_.data_key_by_id(key.key_id) == key.data_key
        assert service_.key_for_patient("P1").key == key
    assert provider.unwraps == before


def test_the_cache_is_bounded_and_evicts_the_least_recently_used(store):
    service_, provider = service(store, max_cached_keys=3)
    try:
        ids = {p: service_.data_key_for_patient(p).key_id for p in ("A", "B", "C")}
        service_.data_key_by_id(ids["A"])  # A is now the most recently used
        ids["D"] = service_.data_key_for_patient("D").key_id  # evicts B
        assert service_.cached_keys == 3
        before = provider.unwraps
        for p in ("A", "C", "D"):
            service_.data_key_by_id(ids[p])
        assert provider.unwraps == before, "A, C and D are cached"
        service_.data_key_by_id(ids["B"])
        assert provider.unwraps == before + 1, "B was evicted"
        assert service_.cached_keys == 3
    finally:
        service_.close()


def test_shred_empties_the_cache_for_the_patient_at_once(keys):
    service_, _ = keys
    shredded = service_.data_key_for_patient("SHRED")
    kept = service_.data_key_for_patient("KEEP")
    assert service_.data_key_by_id(shredded.key_id)
    assert service_.cached_keys == 2
    assert service_.shred_patient("SHRED") == 1
    assert service_.cached_keys == 1, "only the other patient's key is left in memory"
    with pytest.raises(KeyDestroyed):
        service_.data_key_by_id(shredded.key_id)
    assert service_.data_key_by_id(kept.key_id) == kept.data_key
    renewed = service_.data_key_for_patient("SHRED")
    assert renewed.key_id != shredded.key_id, "new data after a shred gets a new key"


def test_a_shred_by_another_process_takes_effect_at_once(keys, store):
    service_, _ = keys
    key = service_.data_key_for_patient("ELSEWHERE")
    assert service_.data_key_by_id(key.key_id) == key.data_key  # cached here
    # Another custodian process sharing the key database (plain KeyService, its own sessions).
    other = KeyService(make_session_factory(store.engine), store.provider, patient_index_key=bytes.fromhex(INDEX_KEY))
    assert other.shred_patient("ELSEWHERE") == 1
    with pytest.raises(KeyDestroyed):
        service_.data_key_by_id(key.key_id)
    assert service_.key_for_patient("ELSEWHERE").wait().key_id != key.key_id


def test_a_lookup_racing_a_shred_does_not_refill_the_cache(keys):
    service_, provider = keys
    key = service_.data_key_for_patient("RACE")
    service_._invalidate()  # noqa: SLF001 - start from an empty cache
    # The shred lands while the lookup is unwrapping the key it read before the shred.
    provider.on_unwrap = lambda: service_.shred_patient("RACE")
    service_.data_key_by_id(key.key_id)
    assert service_.cached_keys == 0
    with pytest.raises(KeyDestroyed):
        service_.data_key_by_id(key.key_id)


@pytest.mark.parametrize("operation", ["rotate", "rewrap"])
def test_key_operations_empty_the_cache(keys, operation: str):
    service_, _ = keys
    for p in ("X", "Y"):
        service_.data_key_for_patient(p)
    assert service_.cached_keys == 2
    getattr(service_, operation)()
    assert service_.cached_keys == 0


# --- new keys: committed before any object under them is acknowledged ---------------------------

def test_wait_returns_only_once_the_key_is_durably_committed(keys, settings, store):
    service_, _ = keys
    with held_commits(store) as release:
        pending = service_.key_for_patient("NEW")
        with pytest.raises(TimeoutError):
            pending.wait(timeout=0.3)
        assert rows(settings, "SELECT id FROM crypto_data_key") == []
        release.set()
        committed = pending.wait(timeout=30)
    assert committed == pending.key
    assert rows(settings, "SELECT id FROM crypto_data_key WHERE destroyed_at IS NULL") == [(committed.key_id,)]


def test_create_does_not_return_before_the_key_commit(keys, settings, store, tmp_path: Path):
    service_, _ = keys
    storage = EncryptedFilesystemStorage(tmp_path / "storage", service_, fsync=False)
    u = str(uuid.uuid4())
    done = threading.Event()
    with held_commits(store) as release:
        worker = threading.Thread(target=lambda: (storage.create(u, 1, dicom("HELD")), done.set()))
        worker.start()
        assert not done.wait(0.5), "create returned (acknowledged) while its data key was not committed"
        release.set()
        worker.join(30)
    assert done.is_set()
    key_id = read_header(storage.path_of(u).read_bytes()).key_id
    assert rows(settings, "SELECT count(*) FROM crypto_data_key WHERE id = ?", key_id) == [(1,)]
    assert storage.read(u, 1) == dicom("HELD")


def test_a_failed_key_commit_fails_the_create_and_leaves_no_object(keys, store, tmp_path: Path):
    service_, _ = keys
    storage = EncryptedFilesystemStorage(tmp_path / "storage", service_, fsync=False)

    def fail(conn: Any) -> None:
        raise OSError("disk full")

    event.listen(store.engine, "commit", fail)
    try:
        u = str(uuid.uuid4())
        with pytest.raises(OSError, match="disk full"):
            storage.create(u, 1, dicom("FAILS"))
        assert not storage.path_of(u).exists()
    finally:
        event.remove(store.engine, "commit", fail)
    u = str(uuid.uuid4())
    storage.create(u, 1, dicom("FAILS"))  # the next attempt creates a key again
    assert storage.read(u, 1) == dicom("FAILS")


def test_new_keys_are_group_committed(keys, settings, store):
    service_, _ = keys
    commits = []
    event.listen(store.engine, "commit", lambda conn: commits.append(1))
    with held_commits(store) as release:
        first = service_.key_for_patient("G0")
        assert release.held.wait(30)  # type: ignore[attr-defined]  # the committer took G0 alone, and is held
        pendings = [service_.key_for_patient(f"G{i}") for i in range(1, 9)]
        release.set()
        for p in [first, *pendings]:
            p.wait(timeout=30)
    assert len(commits) == 2, "one commit for the first key, one for the eight that queued behind it"
    assert rows(settings, "SELECT count(*) FROM crypto_data_key")[0][0] == 9


def test_writers_of_the_same_new_patient_share_one_key(keys, settings, tmp_path: Path):
    service_, _ = keys
    storage = EncryptedFilesystemStorage(tmp_path / "storage", service_, fsync=False)
    data = dicom("SHARED")
    uuids = [str(uuid.uuid4()) for _ in range(16)]
    threads = [threading.Thread(target=storage.create, args=(u, 1, data)) for u in uuids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    key_ids = {read_header(storage.path_of(u).read_bytes()).key_id for u in uuids}
    assert len(key_ids) == 1
    assert rows(settings, "SELECT count(*) FROM crypto_data_key")[0][0] == 1
    assert all(storage.read(u, 1) == data for u in uuids)


def test_if_another_process_committed_the_patients_key_first_the_object_uses_it(keys, store, settings,
                                                                                tmp_path: Path):
    service_, _ = keys
    other = open_key_store(settings)  # another custodian process: its own engine on the same database
    storage = EncryptedFilesystemStorage(tmp_path / "storage", service_, fsync=False)
    u = str(uuid.uuid4())
    release, started = threading.Event(), threading.Event()

    def hold(conn: Any) -> None:  # our committer's transaction waits before its INSERT
        started.set()
        assert release.wait(30)

    pendings: list[PendingKey] = []
    key_for_patient = service_.key_for_patient
    service_.key_for_patient = lambda pid: pendings.append(key_for_patient(pid)) or pendings[-1]  # type: ignore[method-assign]
    event.listen(store.engine, "begin", hold)
    try:
        worker = threading.Thread(target=storage.create, args=(u, 1, dicom("BOTH")))
        worker.start()
        assert started.wait(30)
        theirs = other.keys.data_key_for_patient("BOTH")  # committed first
        assert theirs.key_id != pendings[0].key.key_id
        release.set()
        worker.join(30)
    finally:
        release.set()
        event.remove(store.engine, "begin", hold)
        other.close()
    assert not worker.is_alive()
    assert read_header(storage.path_of(u).read_bytes()).key_id == theirs.key_id, "rewritten under the winner"
    assert storage.read(u, 1) == dicom("BOTH")
    assert rows(settings, "SELECT id FROM crypto_data_key") == [(theirs.key_id,)]


def test_a_committed_pending_key_needs_no_wait():
    from compliance.crypto.keys import DataKey

    key = DataKey("k", b"\0" * 32, b"w")
    assert PendingKey.committed(key).wait(timeout=0) is key
