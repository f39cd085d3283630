"""Where export jobs run, chosen by ``COMPLIANCE_EXPORTS_WORKER_BACKEND``:

- ``inprocess`` (default, one machine): a thread in the gateway polls the SQL database as the queue:
  it selects approved requests (``FOR UPDATE SKIP LOCKED`` on PostgreSQL) and claims each with a
  guarded ``UPDATE ... WHERE state = 'approved'``, so several gateway processes on one database
  never run one request twice. It also expires bundles past their date.
- ``dramatiq`` (at scale): approving a request sends a message to Dramatiq on Redis
  (``COMPLIANCE_EXPORTS_REDIS_URL``); worker processes (``dramatiq compliance.worker``)
  claim the request with the same guarded UPDATE (a redelivered message is a no-op) and run the job.
- ``none``: nothing runs jobs in this process (a gateway node behind which dedicated workers run).

Whatever the backend, the SQL row is the truth (:mod:`compliance.exports.recovery`): a claim takes a
lease that a heartbeat thread renews while the job runs (:func:`run_claimed`), and the sweep
(:class:`Sweeper`: at start, then every ``COMPLIANCE_EXPORTS_SWEEP_INTERVAL_SECONDS``, in the in-process
worker and in every Dramatiq worker process) requeues or fails the jobs whose lease expired, dispatches
the approvals the queue never accepted, and expires old bundles.

The composition root (:attr:`compliance.wiring.Wiring.exports`) builds the same services in the gateway
and in a worker process, so both run the same job code (and read the same destination allow-list and
project registry).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from compliance.exports.jobs import ExportJob
from compliance.exports.keys import ProjectKeyStore
from compliance.exports.recovery import LeaseKeeper, RecoveryPolicy
from compliance.exports.reidentification import ReidentificationService
from compliance.exports.service import ExportService

log = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


#: The Dramatiq queue and actor of export jobs (declared by :mod:`compliance.worker`).
EXPORT_QUEUE = "compliance-exports"
EXPORT_ACTOR = "run_export"


class SqlPollingQueue:
    """The in-process backend: the database is the queue, so enqueue has nothing to do."""

    name = "inprocess"

    def enqueue(self, request_id: str) -> None:
        return None


class DramatiqQueue:
    """The task-queue backend: each approval is a Dramatiq message on Redis for the actor
    :data:`EXPORT_ACTOR` on :data:`EXPORT_QUEUE`, which the worker processes declare
    (:mod:`compliance.worker`). The message is addressed by name, so the gateway never imports the
    workers' module."""

    name = "dramatiq"

    def __init__(self, redis_url: str) -> None:
        from dramatiq.brokers.redis import RedisBroker

        self._broker = RedisBroker(url=redis_url)

    def enqueue(self, request_id: str) -> None:
        import dramatiq

        self._broker.enqueue(dramatiq.Message(queue_name=EXPORT_QUEUE, actor_name=EXPORT_ACTOR, args=(request_id,),
                                              kwargs={}, options={}))


@dataclass
class ExportComponents:
    service: ExportService
    reidentification: ReidentificationService
    job: ExportJob
    keys: ProjectKeyStore


def run_claimed(components: ExportComponents, request_id: str) -> str | None:
    """Claim ``request_id`` and run it under a renewed lease; None when another worker has it (or it is
    no longer approved). Returns the final state, or ``"lost"`` if the sweep handed it on meanwhile."""
    service = components.service
    attempt = service.claim(request_id, worker_name())
    if attempt is None:
        return None
    keeper = LeaseKeeper(lambda: service.renew_lease(request_id, attempt),
                         interval_seconds=service.recovery.heartbeat_seconds, name=f"export-lease-{request_id[:8]}")
    with keeper as lease:
        return components.job.run(request_id, attempt, lease)


class Sweeper:
    """One sweep: expired leases (requeue, or fail after the last attempt, removing its leftovers),
    approvals the task queue never accepted (dispatch), and bundles past their date (expire)."""

    def __init__(self, components: ExportComponents) -> None:
        self._components = components

    def sweep(self) -> dict[str, int]:
        service = self._components.service
        recovered = service.recover_expired()
        for request_id in recovered["failed"]:
            self._components.job.discard_leftovers(request_id)
        # the in-process backend polls the database: an approved row is its own dispatch
        dispatched = 0 if isinstance(service.queue, SqlPollingQueue) else service.dispatch_due()
        expired = service.expire_due()
        counts = {"requeued": len(recovered["requeued"]), "failed": len(recovered["failed"]),
                  "dispatched": dispatched, "expired": expired}
        if any(counts.values()):
            log.info("export sweep: %s", counts)
        return counts


class SweepThread:
    """The sweep in a daemon thread: once at start, then every ``sweep_interval_seconds`` (Dramatiq workers).

    ``components`` is a factory so a worker that cannot reach its database at boot keeps trying.
    """

    def __init__(self, components: Callable[[], ExportComponents]) -> None:
        self._components = components
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="export-sweep", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        interval = RecoveryPolicy().sweep_interval_seconds  # until the components say otherwise
        while not self._stop.is_set():
            try:
                components = self._components()
                interval = components.service.recovery.sweep_interval_seconds
                Sweeper(components).sweep()
            except Exception:
                log.exception("export sweep failed; retrying")
            self._stop.wait(interval)


class InProcessWorker:
    """A daemon thread: poll for approved requests, run them one at a time, expire old bundles."""

    def __init__(self, components: ExportComponents, *, interval_seconds: float = 1.0) -> None:
        self._components = components
        self._interval = interval_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sweeper = Sweeper(components)
        self._next_sweep = 0.0  # at the first poll: recover what a previous process left running

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="export-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_once(self) -> int:
        if time.monotonic() >= self._next_sweep:
            self._sweeper.sweep()
            self._next_sweep = time.monotonic() + self._components.service.recovery.sweep_interval_seconds
        ran = 0
        for request_id in self._components.service.claimable():
            if self._stop.is_set():
                break
            if run_claimed(self._components, request_id) is not None:
                ran += 1
        self._components.service.expire_due()
        return ran

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("export worker: polling failed; retrying")
            self._stop.wait(self._interval)
