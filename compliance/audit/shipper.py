"""The background shipper: delivers the outbox's pending rows to the audit repository.

Shipping (asynchronous): :class:`AuditShipper` reads pending rows in ``seq`` order and hands them to
an :class:`~compliance.audit.interfaces.AuditSink` in batches. Delivery is at least once; the sink uses
the event UUID as an idempotent document id, so a batch re-sent after a crash does not duplicate.
Rows are marked shipped (one UPDATE per run of consecutive positions), never deleted, and always
after the sink confirmed them. While a full batch is in flight, the shipper reads the next one (by
position, after the last one it read) and records the previous batch's result: the database work
overlaps the repository's. On SQLite the marks ride on the writer's next group commit instead of a
transaction of their own (SQLite has one writer at a time, and a separate commit would hold the
requests' commits back); if that fails, the requests are committed without them. Rows the sink
refused stay pending and are sent again once the shipper has caught up (it then rereads from the
oldest pending row).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import orjson

from compliance.audit.checkpoints import AuditCheckpointer
from compliance.audit.interfaces import AuditSink, AuditSinkUnavailable, ShipResult
from compliance.audit.outbox import PendingRow, SqlAuditOutbox

log = logging.getLogger(__name__)


class AuditShipper:
    """Ships pending outbox rows to a sink in a background thread, at least once.

    The background loop keeps at most one batch in flight to the sink (on a helper thread) and does
    the database work around it: while a full batch is being indexed it reads the next one and marks
    the previous one shipped. A row is marked only after the sink confirmed it, so a crash, a kill or
    an unreachable sink leaves it pending and it is sent again (idempotently) later.
    """

    def __init__(
        self,
        outbox: SqlAuditOutbox,
        sink: AuditSink,
        *,
        batch_size: int = 1000,
        interval_seconds: float = 0.5,
        max_backoff_seconds: float = 30.0,
        checkpointer: AuditCheckpointer | None = None,
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
        #: The last position the background loop has read (None: read from the oldest pending row).
        self._cursor: int | None = None
        #: The marks last handed to the outbox writer (rows stay pending until they are committed).
        self._marks: Future[None] | None = None
        self.last_error: str | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="audit-shipper", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, *, drain_seconds: float = 5.0) -> None:
        """Stop the loop, then ship what is still pending (bounded by ``drain_seconds``)."""
        deadline = time.monotonic() + drain_seconds
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            # The loop finishes the batch it has in flight (and records it) before it exits.
            self._thread.join(timeout=max(drain_seconds, 10.0))
        self._settle_marks()
        while time.monotonic() < deadline:
            try:
                if self.ship_once() == 0:
                    break
            except Exception:  # leave the rest in the outbox: the next start ships it
                break
        if self.checkpointer is not None:
            self.checkpointer.tick()

    # -- one batch ------------------------------------------------------------------------------
    def ship_once(self) -> int:
        """Ship the oldest pending batch now; return how many events were delivered.

        Raises AuditSinkUnavailable. (The background loop does the same with the database work
        overlapped; this is for the CLI, draining at stop, and tests.)
        """
        self._ensure_sink()
        batch = self._outbox.pending_rows(self._batch)
        if not batch:
            return 0
        return self._complete(batch, self._send(batch))

    @property
    def sink(self) -> AuditSink:
        """Where the events go (a fan-out reports each sink's health, ``/metrics``)."""
        return self._sink

    def _ensure_sink(self) -> None:
        if not self._sink_ready:
            self._sink.ensure_ready()
            self._sink_ready = True

    def _send(self, batch: Sequence[PendingRow]) -> ShipResult:
        """Hand one batch to the sink: the stored text as it is when the sink takes it, else parsed."""
        ship_serialized = getattr(self._sink, "ship_serialized", None)
        if ship_serialized is not None:
            result: ShipResult = ship_serialized([(r.uuid, r.text) for r in batch])
            return result
        documents: list[tuple[str, dict[str, Any]]] = []
        unreadable: dict[str, str] = {}
        for r in batch:
            try:
                documents.append((r.uuid, orjson.loads(r.text)))
            except orjson.JSONDecodeError as exc:
                unreadable[r.uuid] = f"invalid stored document: {exc}"
        result = self._sink.ship(documents) if documents else ShipResult()
        if unreadable:
            result = ShipResult(shipped=result.shipped, failed={**result.failed, **unreadable},
                                retryable=result.retryable, retryable_ids=result.retryable_ids)
        return result

    def _complete(self, batch: Sequence[PendingRow], result: ShipResult, *, soon: bool = False) -> int:
        """Record what the sink confirmed (shipped) and refused (failed) for one batch.

        ``soon`` (the background loop): the marks may ride on the outbox writer's next commit.
        """
        shipped = set(result.shipped)
        seqs = [r.seq for r in batch if r.uuid in shipped]
        if soon:
            self._marks = self._outbox.mark_shipped_soon(seqs)
        else:
            self._outbox.mark_shipped_seqs(seqs)
        if result.failed:
            self._outbox.mark_failed_each(dict(result.failed))
            log.error("audit shipping rejected %d events: %s", len(result.failed),
                      next(iter(result.failed.values())))
        return sum(1 for r in batch if r.uuid in shipped)

    # -- the background loop ---------------------------------------------------------------------
    def _settle_marks(self, timeout: float = 10.0) -> None:
        """Wait until the marks handed to the writer are committed (before reading from the oldest
        pending row again, which would otherwise send those rows a second time)."""
        marks, self._marks = self._marks, None
        if marks is not None:
            try:
                marks.result(timeout=timeout)
            except Exception:  # noqa: S110 - unmarked rows are only sent again
                pass

    def _fetch_next(self) -> list[PendingRow]:
        if self._cursor is None:
            self._settle_marks()
        batch = self._outbox.pending_rows(self._batch, after_seq=self._cursor)
        if batch:
            self._cursor = batch[-1].seq
        return batch

    def _run(self) -> None:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-shipper-bulk")
        inflight: tuple[list[PendingRow], Future[ShipResult]] | None = None
        backoff = self._interval
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                if self.checkpointer is not None:
                    self.checkpointer.tick()  # never raises: a failed signing is retried next round
                try:
                    self._ensure_sink()
                    batch = self._fetch_next()  # while the previous batch is in flight
                    previous, inflight = inflight, None
                    result = previous[1].result() if previous is not None else None
                    if batch:
                        inflight = (batch, executor.submit(self._send, batch))
                    if previous is not None and result is not None:
                        self._complete(previous[0], result, soon=True)  # while the next batch is in flight
                    self.last_error = None
                    backoff = self._interval
                    if len(batch) >= self._batch:
                        continue  # more is waiting: keep the sink busy
                    rest = self._interval - (time.monotonic() - started)
                    if inflight is not None:
                        if rest <= 0:
                            continue  # busy: this round already took the interval
                        sent, future = inflight
                        inflight = None
                        self._complete(sent, future.result(), soon=True)
                    if not batch:
                        # Caught up: next time read from the oldest pending row again, so rows the
                        # sink refused (or that another process left) are retried.
                        self._cursor = None
                    delay = max(0.0, self._interval - (time.monotonic() - started))
                except AuditSinkUnavailable as exc:
                    self._abandon(inflight)
                    inflight = None
                    self.last_error = str(exc)
                    self._sink_ready = False
                    backoff = min(self._max_backoff, max(backoff * 2, 1.0))
                    delay = backoff
                    log.warning("audit repository unavailable, retrying in %.1fs: %s", backoff, exc)
                except Exception as exc:
                    self._abandon(inflight)
                    inflight = None
                    self.last_error = repr(exc)
                    backoff = min(self._max_backoff, max(backoff * 2, 1.0))
                    delay = backoff
                    log.exception("audit shipper failed, retrying in %.1fs", backoff)
                if delay > 0:
                    self._wake.wait(timeout=delay)
                self._wake.clear()
            if inflight is not None:  # stopping: record the batch that was in flight
                sent, future = inflight
                inflight = None
                self._complete(sent, future.result())
        except Exception:  # stopping with the sink or database failing: the rows stay pending
            log.warning("audit shipper stopped with a batch unconfirmed; it stays pending", exc_info=True)
        finally:
            self._abandon(inflight)
            executor.shutdown(wait=True)

    def _abandon(self, inflight: tuple[list[PendingRow], Future[ShipResult]] | None) -> None:
        """Forget an in-flight batch after a failure: wait for it, record nothing (it stays pending)."""
        self._cursor = None
        if inflight is not None:
            try:
                inflight[1].result()
            except Exception:  # noqa: S110 - its rows stay pending and are sent again
                pass
