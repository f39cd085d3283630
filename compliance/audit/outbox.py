"""The durable audit outbox.

Writing (request path): :class:`SqlAuditOutbox` appends each event's document in a database
transaction that commits before the request's response starts. Concurrent requests of one process
share commits (group commit): a single writer thread drains whatever events are waiting, inserts them
in one transaction, commits once, then releases every waiting request. Each request still waits for
the durable commit of its own event, so nothing is acknowledged that is not on disk; the fsync cost
is paid once per group instead of once per request. Request handlers wait with :meth:`record`: the
writer wakes each event loop once per group (one ``call_soon_threadsafe`` for all of that loop's
waiters), not once per event.

The document is serialised once, when it is linked into the hash chain (canonical JSON, see
compliance/audit/chain.py); the stored text is what the shipper (compliance/audit/shipper.py) sends to
the repository, unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson
from sqlalchemy import Dialect, Engine, bindparam, func, select, update
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql.dml import UpdateBase

from compliance.audit.chain import HASH, PREV, SEQ, extend_serialized
from compliance.audit.models import AuditChainHead, AuditOutboxRow
from compliance.audit.transactions import audit_transaction, sqlite_writes
from compliance.db.base import table_of
from compliance.db.compiled import CompiledInsert
from compliance.errors import AuditFailure

log = logging.getLogger(__name__)

_TABLE = table_of(AuditOutboxRow)
_HEAD = table_of(AuditChainHead)


@dataclass(frozen=True)
class OutboxEntry:
    uuid: str
    event_code: str
    occurred_at: datetime
    document: dict[str, Any]


class PendingRow(NamedTuple):
    """An outbox row waiting for shipping: its chain position, uuid and stored JSON text."""

    seq: int
    uuid: str
    text: str


def seq_ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Runs of consecutive positions, as inclusive ``(first, last)`` pairs: [1,2,3,7,8] -> [(1,3),(7,8)]."""
    ranges: list[tuple[int, int]] = []
    for seq in sorted(set(seqs)):
        if ranges and seq == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], seq)
        else:
            ranges.append((seq, seq))
    return ranges


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _resolve(futures: Sequence[asyncio.Future[None]], error: BaseException | None) -> None:
    """Runs in the waiters' event loop: release every waiter of one group at once."""
    for fut in futures:
        if fut.done():  # the request was cancelled meanwhile; its event is recorded all the same
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


#: What the writer resolves: a thread's concurrent future, or an event loop's future.
_Waiter = Future[None] | tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]

#: Mark a run of positions shipped; rows already marked (by another process) keep their time.
_MARK_SHIPPED = (update(_TABLE)
                 .where(_TABLE.c.seq.between(bindparam("lo"), bindparam("hi")), _TABLE.c.shipped_at.is_(None))
                 .values(shipped_at=bindparam("now")))

_INSERT_COLUMNS = ("seq", "uuid", "event_code", "occurred_at", "document", "recorded_at", "attempts",
                   "prev_hash", "hash")


class _HeadStatements:
    """The chain head's two statements, compiled once for the dialect and run as driver SQL.

    They run in every write transaction (one per event at low load), where building and caching
    the SQLAlchemy constructs each time cost about as much as the database work itself.
    """

    def __init__(self, engine: Engine) -> None:
        dialect = engine.dialect
        self.lock = self._compile(update(_HEAD).where(_HEAD.c.id == bindparam("head_id"))
                                  .values(id=bindparam("same_id")).returning(_HEAD.c.seq, _HEAD.c.hash), dialect)
        self.move = self._compile(update(_HEAD).where(_HEAD.c.id == bindparam("head_id"))
                                  .values(seq=bindparam("new_seq"), hash=bindparam("new_hash")), dialect)
        self.mark = self._compile(_MARK_SHIPPED, dialect)

    @staticmethod
    def _compile(statement: UpdateBase, dialect: Dialect) -> tuple[str, tuple[str, ...] | None]:
        compiled = statement.compile(dialect=dialect)
        return str(compiled), (tuple(compiled.positiontup or ()) if compiled.positional else None)

    @staticmethod
    def params(statement: tuple[str, tuple[str, ...] | None], values: dict[str, Any]) -> Any:
        names = statement[1]
        return values if names is None else tuple(values[n] for n in names)


class _Marks(NamedTuple):
    """Positions the shipper had confirmed, handed to the writer (SQLite) to mark in its next commit."""

    seqs: tuple[int, ...]
    done: Future[None]


class _Prepared(NamedTuple):
    head_seq: int
    head_hash: str
    new_seq: int
    new_hash: str
    params: list[Any]


class SqlAuditOutbox:
    """Appends audit documents durably; group-commits concurrent appends of one process."""

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = _utcnow, max_group: int = 500) -> None:
        self._engine = engine
        self._clock = clock
        self._max_group = max_group
        self._queue: queue.SimpleQueue[tuple[OutboxEntry, _Waiter] | _Marks | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._insert = CompiledInsert(engine, _TABLE, _INSERT_COLUMNS)
        self._head_sql = _HeadStatements(engine)
        self._shipped_processor = _TABLE.c.shipped_at.type.dialect_impl(engine.dialect).bind_processor(engine.dialect)
        #: The chain head as this process last wrote it: rows are linked to it before the write
        #: transaction (and linked again inside it if another writer moved the head meanwhile).
        self._head: tuple[int, str] | None = None
        #: How often (moving average) the head was still ours when the lock was taken. Below 1/2
        #: (several processes appending to one database in turn) linking ahead is skipped: it
        #: would mostly be done twice.
        self._head_kept = 1.0
        #: SQLite: the pooled connection the group-commit writer thread keeps between commits.
        self._writer_conn: PoolProxiedConnection | None = None

    # -- writing -----------------------------------------------------------------------------
    def _prepare(self, entries: Sequence[OutboxEntry], head_seq: int, head_hash: str, now: datetime) -> _Prepared:
        """Link ``entries`` to the head ``(head_seq, head_hash)`` and convert them to driver parameters."""
        insert_ = self._insert
        documents = [dict(e.document) for e in entries]
        new_seq, new_hash, texts = extend_serialized(head_seq, head_hash, documents)
        recorded_at = insert_.convert("recorded_at", now)  # the same for the whole group
        params = [
            insert_.params({
                "seq": doc[SEQ],
                "uuid": e.uuid,
                "event_code": e.event_code,
                "occurred_at": e.occurred_at,
                "document": text,
                "recorded_at": recorded_at,
                "attempts": 0,
                "prev_hash": doc[PREV],
                "hash": doc[HASH],
            }, converted=("recorded_at",))
            for e, doc, text in zip(entries, documents, texts, strict=True)
        ]
        return _Prepared(head_seq, head_hash, new_seq, new_hash, params)

    def append_now(self, entries: Sequence[OutboxEntry], *, shipped_seqs: Sequence[int] = ()) -> None:
        """Insert and commit in the caller's thread (CLI, tests, start-up events).

        The chain head row is locked first (an UPDATE, so SQLite takes its write lock and PostgreSQL
        a row lock at once), then the entries are linked to it and inserted, and the head moves, all
        in one transaction: concurrent writers extend the chain one after the other. The linking and
        serialising is done before the transaction against the head this process last wrote; inside
        the transaction the locked head is compared with it and, if another writer moved it, the
        entries are linked again to the locked head. Either way they extend the head they locked.
        """
        if not entries:
            return
        now = self._clock()
        ranges = seq_ranges(shipped_seqs)
        try:
            cached = self._head
            prepared = None
            if cached is not None and self._head_kept >= 0.5:
                prepared = self._prepare(entries, cached[0], cached[1], now)
            marked = sum(hi - lo + 1 for lo, hi in ranges)
            with self._transaction(rows=len(entries) + marked) as run:
                # The UPDATE takes the lock (SQLite's write lock, PostgreSQL's row lock) and returns the head.
                sql = self._head_sql
                head = run(sql.lock[0], sql.params(sql.lock, {"head_id": 1, "same_id": 1})).fetchone()
                locked = (int(head[0]), str(head[1]))
                self._head_kept = 0.9 * self._head_kept + (0.1 if cached == locked else 0.0)
                if prepared is None or (prepared.head_seq, prepared.head_hash) != locked:
                    prepared = self._prepare(entries, locked[0], locked[1], now)
                run(self._insert.sql, prepared.params, many=True)
                run(sql.move[0], sql.params(sql.move, {
                    "head_id": 1, "new_seq": prepared.new_seq, "new_hash": prepared.new_hash}))
                if ranges:
                    shipped_at = self._shipped_at(now)
                    run(sql.mark[0], [sql.params(sql.mark, {"lo": lo, "hi": hi, "now": shipped_at})
                                      for lo, hi in ranges], many=True)
        except Exception as exc:  # any database failure means the event is not recorded
            self._head = None
            raise AuditFailure("the audit event could not be recorded") from exc
        self._head = (prepared.new_seq, prepared.new_hash)

    @contextmanager
    def _transaction(self, *, rows: int) -> Iterator[Callable[..., Any]]:
        """One write transaction; yields ``run(sql, params, many=False)`` for compiled driver SQL.

        SQLite: on the pooled DBAPI connection itself, under the same in-process write lock and WAL
        bookkeeping as :func:`audit_transaction`. The append is three compiled statements and a
        commit; SQLAlchemy's execution layer around them cost about three times SQLite's own CPU
        per commit (README "Gateway overhead"). Other databases: through ``audit_transaction``.
        """
        if self._engine.dialect.name != "sqlite":
            with audit_transaction(self._engine, rows=rows, documents=True) as conn:
                yield lambda sql, params, many=False: conn.exec_driver_sql(sql, params)
            return
        state = sqlite_writes(self._engine)
        with state.lock:
            # The group-commit writer keeps one connection for as long as it runs (checking one out
            # and back in, with the pool's reset rollback, cost a quarter of its work per commit);
            # any other thread borrows one from the pool.
            writer = threading.current_thread() is self._thread
            pooled = self._writer_conn if writer and self._writer_conn is not None else self._engine.raw_connection()
            kept = False
            try:
                state.prepare_dbapi(pooled)
                cursor = pooled.cursor()
                try:
                    def run(sql: str, params: Any, many: bool = False) -> Any:
                        return cursor.executemany(sql, params) if many else cursor.execute(sql, params)

                    yield run
                    pooled.commit()
                    kept = writer
                except BaseException:
                    pooled.rollback()
                    raise
                finally:
                    cursor.close()
            finally:
                if kept:
                    self._writer_conn = pooled
                else:  # back to the pool (a writer's connection that failed is not kept)
                    if pooled is self._writer_conn:
                        self._writer_conn = None
                    pooled.close()
        state.written(rows)

    def _drop_writer_connection(self) -> None:
        conn, self._writer_conn = self._writer_conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing at exit; the pool disposes of it
                log.debug("closing the outbox writer's connection failed", exc_info=True)

    def _shipped_at(self, now: datetime) -> Any:
        processor = self._shipped_processor
        return now if processor is None else processor(now)

    def shipped_head(self) -> int:
        """The highest chain position delivered to the repository (0 when none)."""
        with self._engine.connect() as conn:
            value = conn.execute(select(func.max(_TABLE.c.seq)).where(_TABLE.c.shipped_at.is_not(None))).scalar()
        return int(value or 0)

    def hash_at(self, seq: int) -> str | None:
        with self._engine.connect() as conn:
            value = conn.execute(select(_TABLE.c.hash).where(_TABLE.c.seq == seq)).scalar()
        return None if value is None else str(value)

    def chain_head(self) -> tuple[int, str]:
        with self._engine.connect() as conn:
            head = conn.execute(select(_HEAD.c.seq, _HEAD.c.hash).where(_HEAD.c.id == 1)).one()
        return int(head.seq), str(head.hash)

    def submit(self, entry: OutboxEntry) -> Future[None]:
        """Queue one entry for the group-commit writer; the future resolves once it is durable."""
        self._ensure_writer()
        fut: Future[None] = Future()
        self._queue.put((entry, fut))
        return fut

    async def record(self, entry: OutboxEntry) -> None:
        """Append ``entry`` through the group-commit writer; return once it is durably committed.

        Raises :class:`~compliance.errors.AuditFailure` when it could not be recorded.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._ensure_writer()
        self._queue.put((entry, (loop, fut)))
        await fut

    def _ensure_writer(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._writer_loop, name="audit-outbox-writer", daemon=True)
                self._thread.start()

    def _writer_loop(self) -> None:
        try:
            self._write_groups()
        finally:
            self._drop_writer_connection()

    def _write_groups(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            group: list[tuple[OutboxEntry, _Waiter]] = []
            shipped: list[int] = []
            marks: list[Future[None]] = []
            stopping = False
            while True:
                if isinstance(item, _Marks):
                    shipped.extend(item.seqs)
                    marks.append(item.done)
                else:
                    group.append(item)
                if len(group) >= self._max_group:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
            if group:
                self._append_group(group, shipped)
            elif shipped:
                self._mark_quietly(shipped)
            for done in marks:
                done.set_result(None)
            if stopping:
                return

    def _append_group(self, group: Sequence[tuple[OutboxEntry, _Waiter]], shipped: Sequence[int]) -> None:
        error: AuditFailure | None = None
        entries = [e for e, _ in group]
        try:
            self.append_now(entries, shipped_seqs=shipped)
        except AuditFailure as exc:
            error = exc
            if shipped:  # never let the shipper's bookkeeping fail a request: try without it
                try:
                    self.append_now(entries)
                    error = None
                except AuditFailure as again:
                    error = again
                if error is None:
                    self._mark_quietly(shipped)
        except Exception as exc:  # never leave a waiter hanging
            error = AuditFailure("the audit event could not be recorded")
            error.__cause__ = exc
        self._release([w for _, w in group], error)

    def _mark_quietly(self, seqs: Sequence[int]) -> None:
        try:
            self.mark_shipped_seqs(seqs)
        except Exception:  # the rows stay pending and are shipped (idempotently) again
            log.warning("could not mark %d audit events shipped; they will be sent again", len(seqs),
                        exc_info=True)

    def mark_shipped_soon(self, seqs: Iterable[int]) -> Future[None]:
        """:meth:`mark_shipped_seqs`, but on SQLite done by the group-commit writer in its next commit.

        SQLite has one writer at a time: a separate transaction (and fsync) for the marks would hold
        the requests' commits back for its whole duration. Until the writer commits them, the rows
        stay pending; a crash before then only means they are shipped (idempotently) again. The
        future resolves once the writer has dealt with them (marked, or given up: still pending).
        """
        done: Future[None] = Future()
        seqs = tuple(seqs)
        if seqs and self._engine.dialect.name == "sqlite":
            self._ensure_writer()
            self._queue.put(_Marks(seqs, done))
            return done
        try:
            self.mark_shipped_seqs(seqs)
        finally:
            done.set_result(None)
        return done

    @staticmethod
    def _release(waiters: Sequence[_Waiter], error: BaseException | None) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for waiter in waiters:
            if isinstance(waiter, Future):
                try:
                    if error is None:
                        waiter.set_result(None)
                    else:
                        waiter.set_exception(error)
                except InvalidStateError:  # cancelled by its caller: the event is recorded all the same
                    pass
            else:
                by_loop.setdefault(waiter[0], []).append(waiter[1])
        for loop, futures in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, futures, error)
            except RuntimeError:  # that event loop is closed: nobody is waiting any more
                log.warning("audit waiters of a closed event loop dropped (%d)", len(futures))

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=10)

    # -- reading (shipper, status) ------------------------------------------------------------
    def pending(self, limit: int) -> list[tuple[int, str, dict[str, Any]]]:
        """The oldest pending rows as ``(seq, uuid, document)`` (parsed; for tools and tests)."""
        return [(r.seq, r.uuid, orjson.loads(r.text)) for r in self.pending_rows(limit)]

    def pending_rows(self, limit: int, *, after_seq: int | None = None) -> list[PendingRow]:
        """Pending rows in chain order with their stored JSON text, from the oldest or after ``after_seq``."""
        stmt = select(_TABLE.c.seq, _TABLE.c.uuid, _TABLE.c.document).where(_TABLE.c.shipped_at.is_(None))
        if after_seq is not None:
            stmt = stmt.where(_TABLE.c.seq > after_seq)
        stmt = stmt.order_by(_TABLE.c.seq).limit(limit)
        with self._engine.connect() as conn:
            return [PendingRow(int(seq), uuid, text) for seq, uuid, text in conn.execute(stmt).all()]

    def mark_shipped(self, uuids: Sequence[str]) -> None:
        if not uuids:
            return
        with audit_transaction(self._engine, rows=len(uuids)) as conn:
            conn.execute(
                update(_TABLE).where(_TABLE.c.uuid.in_(list(uuids))).values(shipped_at=self._clock())
            )

    def mark_shipped_seqs(self, seqs: Iterable[int]) -> None:
        """Mark rows shipped by chain position: one UPDATE per run of consecutive positions.

        Rows already marked (by another gateway process shipping the same rows) keep their time.
        """
        ranges = seq_ranges(seqs)
        if not ranges:
            return
        now = self._clock()
        with audit_transaction(self._engine, rows=sum(hi - lo + 1 for lo, hi in ranges)) as conn:
            conn.execute(_MARK_SHIPPED, [{"lo": lo, "hi": hi, "now": now} for lo, hi in ranges])

    def mark_failed(self, uuids: Sequence[str], error: str) -> None:
        self.mark_failed_each({u: error for u in uuids})

    def mark_failed_each(self, reasons: dict[str, str]) -> None:
        """Count one more failed attempt for each uuid, with its reason (one transaction)."""
        if not reasons:
            return
        stmt = (update(_TABLE).where(_TABLE.c.uuid == bindparam("u"))
                .values(attempts=_TABLE.c.attempts + 1, last_error=bindparam("reason")))
        with audit_transaction(self._engine, rows=len(reasons)) as conn:
            conn.execute(stmt, [{"u": u, "reason": r[:2000]} for u, r in reasons.items()])

    def backlog(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.count()).where(_TABLE.c.shipped_at.is_(None))).scalar_one())

    def total(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(_TABLE)).scalar_one())
