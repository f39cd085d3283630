"""The durable audit outbox and the background shipper.

Writing (request path): :class:`SqlAuditOutbox` appends each event's document in a database
transaction that commits before the request's response starts. Concurrent requests of one process
share commits (group commit): a single writer thread drains whatever events are waiting, inserts them
in one transaction, commits once, then releases every waiting request. Each request still waits for
the durable commit of its own event, so nothing is acknowledged that is not on disk; the fsync cost
is paid once per group instead of once per request.

Shipping (asynchronous): :class:`AuditShipper` reads pending rows in ``seq`` order and hands them to
an :class:`~compliance.audit.interfaces.AuditSink` in batches. Delivery is at least once; the sink uses
the event UUID as an idempotent document id, so a batch re-sent after a crash does not duplicate.
Rows are marked shipped, never deleted.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Engine, Table, func, insert, select, update

from compliance.audit.chain import HASH, PREV, SEQ, extend_serialized
from compliance.audit.interfaces import AuditSink, AuditSinkUnavailable
from compliance.audit.models import AuditChainHead, AuditOutboxRow
from compliance.errors import AuditFailure

log = logging.getLogger(__name__)

_TABLE: Table = AuditOutboxRow.__table__  # type: ignore[assignment]
_HEAD: Table = AuditChainHead.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class OutboxEntry:
    uuid: str
    event_code: str
    occurred_at: datetime
    document: dict[str, Any]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class SqlAuditOutbox:
    """Appends audit documents durably; group-commits concurrent appends of one process."""

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = _utcnow, max_group: int = 500) -> None:
        self._engine = engine
        self._clock = clock
        self._max_group = max_group
        self._queue: queue.Queue[tuple[OutboxEntry, Future[None]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- writing -----------------------------------------------------------------------------
    def append_now(self, entries: Sequence[OutboxEntry]) -> None:
        """Insert and commit in the caller's thread (CLI, tests, start-up events).

        The chain head row is locked first (an UPDATE, so SQLite takes its write lock and PostgreSQL
        a row lock at once), then the entries are linked to it and inserted, and the head moves, all
        in one transaction: concurrent writers extend the chain one after the other.
        """
        if not entries:
            return
        now = self._clock()
        documents = [dict(e.document) for e in entries]
        try:
            with self._engine.begin() as conn:
                conn.execute(update(_HEAD).where(_HEAD.c.id == 1).values(id=1))
                head = conn.execute(select(_HEAD.c.seq, _HEAD.c.hash).where(_HEAD.c.id == 1)).one()
                new_seq, new_hash, texts = extend_serialized(int(head.seq), str(head.hash), documents)
                rows = [
                    {
                        "seq": doc[SEQ],
                        "uuid": e.uuid,
                        "event_code": e.event_code,
                        "occurred_at": e.occurred_at,
                        "document": text,
                        "recorded_at": now,
                        "attempts": 0,
                        "prev_hash": doc[PREV],
                        "hash": doc[HASH],
                    }
                    for e, doc, text in zip(entries, documents, texts, strict=True)
                ]
                conn.execute(insert(_TABLE), rows)
                conn.execute(update(_HEAD).where(_HEAD.c.id == 1).values(seq=new_seq, hash=new_hash))
        except Exception as exc:  # any database failure means the event is not recorded
            raise AuditFailure("the audit event could not be recorded") from exc

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

    def _ensure_writer(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._writer_loop, name="audit-outbox-writer", daemon=True)
                self._thread.start()

    def _writer_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            group = [item]
            while len(group) < self._max_group:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                group.append(nxt)
            try:
                self.append_now([e for e, _ in group])
            except AuditFailure as exc:
                for _, fut in group:
                    fut.set_exception(exc)
            else:
                for _, fut in group:
                    fut.set_result(None)

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=10)

    # -- reading (shipper, status) ------------------------------------------------------------
    def pending(self, limit: int) -> list[tuple[int, str, dict[str, Any]]]:
        stmt = (
            select(_TABLE.c.seq, _TABLE.c.uuid, _TABLE.c.document)
            .where(_TABLE.c.shipped_at.is_(None))
            .order_by(_TABLE.c.seq)
            .limit(limit)
        )
        with self._engine.connect() as conn:
            return [(r.seq, r.uuid, orjson.loads(r.document)) for r in conn.execute(stmt)]

    def mark_shipped(self, uuids: Sequence[str]) -> None:
        if not uuids:
            return
        with self._engine.begin() as conn:
            conn.execute(
                update(_TABLE).where(_TABLE.c.uuid.in_(list(uuids))).values(shipped_at=self._clock())
            )

    def mark_failed(self, uuids: Sequence[str], error: str) -> None:
        if not uuids:
            return
        with self._engine.begin() as conn:
            conn.execute(
                update(_TABLE)
                .where(_TABLE.c.uuid.in_(list(uuids)))
                .values(attempts=_TABLE.c.attempts + 1, last_error=error[:2000])
            )

    def backlog(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.count()).where(_TABLE.c.shipped_at.is_(None))).scalar_one())

    def total(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(_TABLE)).scalar_one())


class AuditShipper:
    """Ships pending outbox rows to a sink in a background thread, at least once."""

    def __init__(
        self,
        outbox: SqlAuditOutbox,
        sink: AuditSink,
        *,
        batch_size: int = 1000,
        interval_seconds: float = 0.5,
        max_backoff_seconds: float = 30.0,
        checkpointer: Any = None,
    ) -> None:
        self._outbox = outbox
        #: Signs periodic checkpoints (compliance/audit/checkpoints.py AuditCheckpointer), optional.
        self.checkpointer = checkpointer
        self._sink = sink
        self._batch = batch_size
        self._interval = interval_seconds
        self._max_backoff = max_backoff_seconds
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._sink_ready = False
        self.last_error: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-shipper", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, *, drain_seconds: float = 5.0) -> None:
        """Stop after a last attempt to ship what is pending (bounded by ``drain_seconds``)."""
        deadline = time.monotonic() + drain_seconds
        while time.monotonic() < deadline:
            try:
                if self.ship_once() == 0:
                    break
            except Exception:  # leave the rest in the outbox: the next start ships it
                break
        if self.checkpointer is not None:
            self.checkpointer.tick()
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def ship_once(self) -> int:
        """Ship one batch; return how many events were delivered. Raises AuditSinkUnavailable."""
        if not self._sink_ready:
            self._sink.ensure_ready()
            self._sink_ready = True
        batch = self._outbox.pending(self._batch)
        if not batch:
            return 0
        result = self._sink.ship([(uuid, doc) for _, uuid, doc in batch])
        self._outbox.mark_shipped(list(result.shipped))
        if result.failed:
            for uuid, reason in result.failed.items():
                self._outbox.mark_failed([uuid], reason)
            log.error("audit shipping rejected %d events: %s", len(result.failed),
                      next(iter(result.failed.values())))
        return len(result.shipped)

    def _run(self) -> None:
        backoff = self._interval
        while not self._stop.is_set():
            if self.checkpointer is not None:
                self.checkpointer.tick()  # never raises: a failed signing is retried next round
            try:
                shipped = self.ship_once()
                self.last_error = None
                backoff = self._interval
                if shipped >= self._batch:
                    continue  # more is waiting
            except AuditSinkUnavailable as exc:
                self.last_error = str(exc)
                self._sink_ready = False
                backoff = min(self._max_backoff, max(backoff * 2, 1.0))
                log.warning("audit repository unavailable, retrying in %.1fs: %s", backoff, exc)
            except Exception as exc:
                self.last_error = repr(exc)
                backoff = min(self._max_backoff, max(backoff * 2, 1.0))
                log.exception("audit shipper failed, retrying in %.1fs", backoff)
            self._wake.wait(timeout=backoff)
            self._wake.clear()
