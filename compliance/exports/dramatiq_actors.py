"""Dramatiq actors for export jobs (the task-queue backend, Redis as the broker).

Start workers with::

    COMPLIANCE_EXPORTS_WORKER_BACKEND=dramatiq dramatiq compliance.exports.dramatiq_actors --processes 2 --threads 1

Each worker process builds its own database engine, audit outbox and key store from the same
settings as the gateway; audit events go to the shared outbox and the gateway ships them. Delivery
is at least once; the guarded claim makes a redelivered message a no-op.

A message is only a hint: the approved row is the truth. Each worker process runs the export sweep
(``workers.SweepThread``: at boot, then periodically): it requeues the jobs of workers that died
(expired leases) and sends the messages the gateway could not (Redis unreachable at approval) or
that were lost, so a worker started after an outage picks up every approved request.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker

log = logging.getLogger(__name__)

_lock = threading.RLock()
_components: Any = None
_actor: Any = None


def _build() -> Any:
    global _components
    with _lock:
        if _components is None:
            from compliance.audit.atna import AuditSource
            from compliance.audit.outbox import SqlAuditOutbox
            from compliance.audit.recorder import AuditRecorder
            from compliance.config import get_settings
            from compliance.db.session import make_engine
            from compliance.exports.workers import DramatiqQueue, build_export_components

            settings = get_settings()
            engine = make_engine(settings.effective_database_url)
            recorder = AuditRecorder(SqlAuditOutbox(engine),
                                     AuditSource(source_id=settings.audit_source_id,
                                                 enterprise_site_id=settings.audit_enterprise_site_id),
                                     fail_closed=True)
            # the queue, so the sweep of this worker can (re)dispatch approved requests
            _components = build_export_components(settings, engine, recorder,
                                                  queue=DramatiqQueue(settings.exports_redis_url))
        return _components


def run_export(request_id: str) -> None:
    from compliance.exports.workers import run_claimed

    state = run_claimed(_build(), request_id)
    log.info("export %s: %s", request_id, state or "already claimed elsewhere")


class ExportSweepMiddleware(dramatiq.Middleware):
    """Runs the export sweep in each worker process (never in a gateway, which only sends messages)."""

    def __init__(self) -> None:
        self._sweep: Any = None

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        from compliance.exports.workers import SweepThread

        self._sweep = SweepThread(_build)
        self._sweep.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self._sweep is not None:
            self._sweep.stop()


def configure(redis_url: str) -> Any:
    """Set the broker and register the actor once per process; return the actor."""
    global _actor
    with _lock:
        if _actor is None:
            broker = RedisBroker(url=redis_url)
            broker.add_middleware(ExportSweepMiddleware())
            dramatiq.set_broker(broker)
            # Jobs are long; failures are recorded on the request (failed), so no automatic retries.
            _actor = dramatiq.actor(queue_name="compliance-exports", max_retries=0,
                                    time_limit=6 * 3600 * 1000)(run_export)
        return _actor


def _configure_from_settings() -> None:
    from compliance.config import get_settings

    settings = get_settings()
    if settings.exports_worker_backend == "dramatiq":
        configure(settings.exports_redis_url)


# Imported by the ``dramatiq`` command: the module must declare its actor at import.
_configure_from_settings()
