"""Write transactions on the audit tables, and what SQLite needs for them to stay off each other's way.

Every audit write (the outbox's group commit, the shipper marking rows shipped or failed, the
checkpoint store) goes through :func:`audit_transaction`. On PostgreSQL that is just a transaction:
it locks rows, and the chain head row lock orders the appends. On SQLite, one writer at a time holds
the database, and two things would otherwise make the request path wait longer than the writes take:

* **Busy waiting.** A second writer waits in SQLite's busy handler, which sleeps 1, 2, 5, 10 ... ms
  between tries, so it usually starts well after the first one committed. Inside one process these
  transactions take a lock here first instead, and the next one starts the moment the previous one
  commits. Other processes on the same file still meet at SQLite's own lock (and its busy handler).
* **WAL checkpoints in the committing thread.** By default the commit that grows the write-ahead log
  past 1000 pages copies the log into the database file, with its fsyncs, before it returns: the
  group of requests waiting for that commit waits for the copy too. The audit transactions' own
  connections only do that as a safety net past :data:`SAFETY_PAGES`; a background thread runs a
  ``PASSIVE`` checkpoint (it never blocks writers or readers) every :data:`CHECKPOINT_EVERY_ROWS`
  rows written. Durability is unchanged: every commit is still fsynced to the log (synchronous=FULL),
  and a checkpoint only moves committed data from the log into the database file.

On PostgreSQL, a transaction that inserts outbox documents (``documents=True``) compresses them with
lz4 instead of the server's default pglz (``SET LOCAL default_toast_compression``, this transaction
only, when the server supports it): a document of a few KiB is compressed inline on insert, and pglz
was a third of the insert's cost. Readers are unaffected (PostgreSQL decompresses either).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine
from sqlalchemy.pool import PoolProxiedConnection

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_EVERY_ROWS", "SAFETY_PAGES", "audit_transaction", "sqlite_writes"]

#: Rows written (inserted or marked) after which the background thread checkpoints the log.
CHECKPOINT_EVERY_ROWS = 500
#: ``wal_autocheckpoint`` of the audit transactions' connections: only reached if the background
#: checkpoints fall behind (40 MB of log with 4 KiB pages).
SAFETY_PAGES = 10_000
#: The background thread ends after this long without work (started again when needed).
_IDLE_SECONDS = 10.0


class _SqliteWrites:
    """One per SQLite engine: the in-process write lock and the background checkpointing."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self._rows = 0
        self._due = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self.checkpoints = 0

    def prepare(self, conn: Connection) -> None:
        self.prepare_dbapi(conn.connection)

    def prepare_dbapi(self, pooled: PoolProxiedConnection) -> None:
        """``pooled``: SQLAlchemy's pooled DBAPI connection (its ``info`` lives as long as the connection)."""
        info = pooled.info
        if info.get("audit_wal_autocheckpoint") != SAFETY_PAGES:
            cursor = pooled.cursor()
            try:
                cursor.execute(f"PRAGMA wal_autocheckpoint={SAFETY_PAGES}")
            finally:
                cursor.close()
            info["audit_wal_autocheckpoint"] = SAFETY_PAGES

    def written(self, rows: int) -> None:
        self._rows += rows  # approximate under concurrency, which is all a trigger needs
        if self._rows < CHECKPOINT_EVERY_ROWS:
            return
        self._rows = 0
        self._due.set()
        with self._thread_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-sqlite-wal", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            if not self._due.wait(timeout=_IDLE_SECONDS):
                with self._thread_lock:
                    if not self._due.is_set():  # idle: end (written() starts a new thread when needed)
                        self._thread = None
                        return
                continue
            self._due.clear()
            self.checkpoint()

    def checkpoint(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
            self.checkpoints += 1
        except Exception as exc:  # the next one (or the safety net) catches up
            log.debug("audit WAL checkpoint failed: %s", exc)


_STATES: weakref.WeakKeyDictionary[Engine, _SqliteWrites] = weakref.WeakKeyDictionary()
#: PostgreSQL engines: whether the server takes ``default_toast_compression = lz4``.
_LZ4: weakref.WeakKeyDictionary[Engine, bool] = weakref.WeakKeyDictionary()
_SET_LZ4 = "SET LOCAL default_toast_compression = 'lz4'"
_STATES_GUARD = threading.Lock()


def sqlite_writes(engine: Engine) -> _SqliteWrites:
    """The in-process write lock and WAL bookkeeping of a SQLite engine's audit transactions."""
    with _STATES_GUARD:
        state = _STATES.get(engine)
        if state is None:
            state = _STATES[engine] = _SqliteWrites(engine)
        return state


def _postgres_lz4(engine: Engine) -> bool:
    supported = _LZ4.get(engine)
    if supported is None:
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(_SET_LZ4)
                conn.rollback()
            supported = True
        except Exception as exc:  # PostgreSQL < 14, or built without lz4: keep the default
            log.info("audit outbox: PostgreSQL has no lz4 compression (%s); documents use the default", exc)
            supported = False
        _LZ4[engine] = supported
    return supported


@contextmanager
def audit_transaction(engine: Engine, *, rows: int = 1, documents: bool = False) -> Iterator[Connection]:
    """A write transaction on the audit tables (commits on exit, rolls back on an exception).

    ``rows``: how many rows it inserts or updates (SQLite: counts towards the next WAL checkpoint).
    ``documents``: it inserts outbox documents (PostgreSQL: compressed with lz4 when available).
    """
    if engine.dialect.name != "sqlite":
        lz4 = documents and engine.dialect.name == "postgresql" and _postgres_lz4(engine)
        with engine.begin() as conn:
            if lz4:
                conn.exec_driver_sql(_SET_LZ4)
            yield conn
        return
    state = sqlite_writes(engine)
    with state.lock, engine.begin() as conn:
        state.prepare(conn)
        yield conn
    state.written(rows)
