"""The export worker process for the task-queue backend (Dramatiq on Redis).

Start workers with::

    COMPLIANCE_EXPORTS_WORKER_BACKEND=dramatiq dramatiq compliance.worker --processes 2 --threads 1

Each worker process takes its services from the composition root (:class:`compliance.wiring.Wiring`,
role worker) built from the same settings as the gateway: its own database engine, audit outbox and key
store. Audit events go to the shared outbox and the gateway ships them. Delivery is at least once; the
guarded claim makes a redelivered message a no-op.

A message is only a hint: the approved row is the truth. Each worker process runs the export sweep
(:class:`compliance.exports.workers.SweepThread`: at boot, then periodically): it requeues the jobs of
workers that died (expired leases) and sends the messages the gateway could not (Redis unreachable at
approval) or that were lost, so a worker started after an outage picks up every approved request.

The gateway sends messages to the actor by name (:class:`compliance.exports.workers.DramatiqQueue`);
nothing imports this module but the ``dramatiq`` command.
"""

from __future__ import annotations

import logging
import threading

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from compliance.config import get_settings
from compliance.exports.workers import EXPORT_ACTOR, EXPORT_QUEUE, ExportComponents, SweepThread, run_claimed
from compliance.wiring import Role, Wiring

log = logging.getLogger(__name__)

_lock = threading.Lock()
_wiring: Wiring | None = None


def _components() -> ExportComponents:
    """This process's export services, built on first use (a worker that cannot reach its database at
    boot keeps trying from the sweep)."""
    global _wiring
    with _lock:
        if _wiring is None:
            _wiring = Wiring(get_settings(), Role.WORKER)
        return _wiring.exports


def run_export(request_id: str) -> None:
    state = run_claimed(_components(), request_id)
    log.info("export %s: %s", request_id, state or "already claimed elsewhere")


class ExportSweepMiddleware(dramatiq.Middleware):
    """Runs the export sweep in each worker process."""

    def __init__(self) -> None:
        self._sweep: SweepThread | None = None

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self._sweep = SweepThread(_components)
        self._sweep.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self._sweep is not None:
            self._sweep.stop()


# The ``dramatiq`` command imports this module: it must set the broker and declare its actor at import.
broker = RedisBroker(url=get_settings().exports_redis_url)
broker.add_middleware(ExportSweepMiddleware())
dramatiq.set_broker(broker)
# Jobs are long; failures are recorded on the request (failed), so no automatic retries.
export_actor = dramatiq.actor(actor_name=EXPORT_ACTOR, queue_name=EXPORT_QUEUE, max_retries=0,
                              time_limit=6 * 3600 * 1000)(run_export)
