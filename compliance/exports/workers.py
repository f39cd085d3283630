"""Where export jobs run, chosen by ``COMPLIANCE_EXPORTS_WORKER_BACKEND``:

- ``inprocess`` (default, one machine): a thread in the gateway polls the SQL database as the queue:
  it selects approved requests (``FOR UPDATE SKIP LOCKED`` on PostgreSQL) and claims each with a
  guarded ``UPDATE ... WHERE state = 'approved'``, so several gateway processes on one database
  never run one request twice. It also expires bundles past their date.
- ``dramatiq`` (at scale): approving a request sends a message to Dramatiq on Redis
  (``COMPLIANCE_EXPORTS_REDIS_URL``); worker processes (``dramatiq compliance.exports.dramatiq_actors``)
  claim the request with the same guarded UPDATE (a redelivered message is a no-op) and run the job.
- ``none``: nothing runs jobs in this process (a gateway node behind which dedicated workers run).

Whatever the backend, the SQL row is the truth (:mod:`compliance.exports.recovery`): a claim takes a
lease that a heartbeat thread renews while the job runs (:func:`run_claimed`), and the sweep
(:class:`Sweeper`: at start, then every ``COMPLIANCE_EXPORTS_SWEEP_INTERVAL_SECONDS``, in the in-process
worker and in every Dramatiq worker process) requeues or fails the jobs whose lease expired, dispatches
the approvals the queue never accepted, and expires old bundles.

``build_export_components(settings, engine, auditor)`` builds the same services in the gateway and in
a worker process, so both run the same job code (and read the same destination allow-list and project
registry).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine

from compliance.audit.recorder import AuditRecorder
from compliance.config import Settings
from compliance.crypto.providers.local import LocalKeyProvider
from compliance.db.session import make_session_factory
from compliance.exports.destinations import load_destinations
from compliance.exports.interfaces import ExportQueue
from compliance.exports.jobs import DicomwebArchiveReader, ExportJob
from compliance.exports.keys import ProjectKeyStore, PseudonymMap
from compliance.exports.projects import load_projects
from compliance.exports.recovery import LeaseKeeper, RecoveryPolicy
from compliance.exports.service import ExportService, ReidentificationService

log = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


class SqlPollingQueue:
    """The in-process backend: the database is the queue, so enqueue has nothing to do."""

    name = "inprocess"

    def enqueue(self, request_id: str) -> None:
        return None


class DramatiqQueue:
    name = "dramatiq"

    def __init__(self, redis_url: str) -> None:
        from compliance.exports import dramatiq_actors

        self._actor = dramatiq_actors.configure(redis_url)

    def enqueue(self, request_id: str) -> None:
        self._actor.send(request_id)


@dataclass
class ExportComponents:
    service: ExportService
    reidentification: ReidentificationService
    job: ExportJob
    keys: ProjectKeyStore


def build_export_components(settings: Settings, engine: Engine, auditor: AuditRecorder,
                            queue: ExportQueue | None = None,
                            recovery: RecoveryPolicy | None = None) -> ExportComponents:
    sessions = make_session_factory(engine)
    keyring = settings.exports_keyring_file or settings.stack_dir / "keys" / "exports-keyring.json"
    development = settings.environment == "development"
    provider = LocalKeyProvider(keyring, environment=settings.environment,
                                explicit_path=settings.exports_keyring_file is not None,
                                create_if_missing=development)
    projects = load_projects(settings.exports_projects_file)
    keys = ProjectKeyStore(sessions, provider, create_kek_if_missing=development, registered=projects.is_registered)
    destinations = load_destinations(settings.exports_destinations_file, environment=settings.environment,
                                     projects=projects)
    service = ExportService(sessions, auditor, keys, gateway_id=settings.audit_source_id, queue=queue,
                            bundle_ttl=timedelta(hours=settings.exports_bundle_ttl_hours), destinations=destinations,
                            recovery=recovery or RecoveryPolicy.from_settings(settings), projects=projects)
    pseudonyms = PseudonymMap(sessions, keys)

    def archive() -> DicomwebArchiveReader:
        return DicomwebArchiveReader(settings.archive_url, settings.archive_dicomweb_path,
                                     username=settings.archive_username,
                                     password=settings.archive_password.get_secret_value(),
                                     timeout=settings.archive_timeout_seconds)

    job = ExportJob(service, pseudonyms, auditor, archive,
                    bundles_dir=settings.exports_dir or settings.stack_dir / "exports",
                    archive_id=settings.archive_dicomweb_url, destinations=destinations,
                    stow_batch_instances=settings.exports_stow_batch_instances,
                    stow_batch_max_bytes=settings.exports_stow_batch_max_bytes)
    reid = ReidentificationService(sessions, auditor, pseudonyms, gateway_id=settings.audit_source_id)
    return ExportComponents(service, reid, job, keys)


def build_queue(settings: Settings) -> ExportQueue | None:
    backend = settings.exports_worker_backend
    if backend == "dramatiq":
        return DramatiqQueue(settings.exports_redis_url)
    if backend == "inprocess":
        return SqlPollingQueue()
    return None


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
        self._c = components

    def sweep(self) -> dict[str, int]:
        service = self._c.service
        recovered = service.recover_expired()
        for request_id in recovered["failed"]:
            self._c.job.discard_leftovers(request_id)
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
        self._c = components
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
            self._next_sweep = time.monotonic() + self._c.service.recovery.sweep_interval_seconds
        ran = 0
        for request_id in self._c.service.claimable():
            if self._stop.is_set():
                break
            if run_claimed(self._c, request_id) is not None:
                ran += 1
        self._c.service.expire_due()
        return ran

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("export worker: polling failed; retrying")
            self._stop.wait(self._interval)
