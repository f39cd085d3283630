"""The export job: archive -> de-identification -> leak gate -> an encrypted bundle
(:mod:`compliance.exports.bundle_delivery`), or STOW-RS to a research archive
(:mod:`compliance.exports.push_delivery`), as the request's destination says.

What both share (the plan, one instance through the engine and the leak gate, the counters, the
disclosure) is :mod:`compliance.exports.pipeline`; the archive is read by
:class:`compliance.dicomweb.reader.DicomwebArchiveReader` in the gateway.

Every write of a job is fenced by its attempt number (:mod:`compliance.exports.recovery`): a job whose
request was handed to another attempt stops at its next checkpoint and changes nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from compliance.audit.recorder import AuditRecorder
from compliance.exports.bundle_delivery import BundleDelivery
from compliance.exports.destinations import DICOMWEB, DestinationRegistry, DicomwebDestination, DicomwebStowClient
from compliance.exports.interfaces import ArchiveReader, StowClient
from compliance.exports.keys import PseudonymMap
from compliance.exports.pipeline import Counters, JobError, JobSteps, Lease
from compliance.exports.push_delivery import PushDelivery
from compliance.exports.recovery import LeaseLost, NoLease
from compliance.exports.service import ExportService

log = logging.getLogger(__name__)


class ExportJob:
    def __init__(self, service: ExportService, pseudonyms: PseudonymMap, auditor: AuditRecorder,
                 archive_factory: Callable[[], ArchiveReader], *, bundles_dir: Path, archive_id: str,
                 progress_every_seconds: float = 0.5, destinations: DestinationRegistry | None = None,
                 stow_client_factory: Callable[[DicomwebDestination], StowClient] = DicomwebStowClient,
                 stow_batch_instances: int = 16, stow_batch_max_bytes: int = 64 << 20) -> None:
        self._ledger = service.ledger
        self._requests = service.requests
        steps = JobSteps(service.ledger, service.keys, auditor, archive_factory, gateway_id=service.gateway_id,
                         archive_id=archive_id, progress_every_seconds=progress_every_seconds)
        self._bundle = BundleDelivery(steps, pseudonyms, bundles_dir=bundles_dir)
        self._push = PushDelivery(steps, service.delivery_log, pseudonyms, destinations or DestinationRegistry(),
                                  stow_client_factory=stow_client_factory, batch_instances=stow_batch_instances,
                                  batch_max_bytes=stow_batch_max_bytes)

    def run(self, request_id: str, attempt: int | None = None, lease: Lease | None = None) -> str:
        """Run a claimed (running) request to ready or failed; return the final state.

        ``attempt`` is what :meth:`~compliance.exports.ledger.JobLedger.claim` returned (the fencing token; the row's by
        default), ``lease`` the claim's :class:`~compliance.exports.recovery.LeaseKeeper`. Returns
        ``"lost"`` when the request was handed to another attempt meanwhile: this one wrote nothing more.
        """
        counters = Counters()
        lease = lease or NoLease()
        if attempt is None:
            attempt = self._ledger.load(request_id).attempts
        try:
            return self._run(request_id, attempt, lease, counters)
        except LeaseLost as exc:
            log.warning("export job %s, attempt %s, stopped: %s", request_id, attempt, exc)
            return "lost"
        except Exception as exc:
            log.exception("export job %s failed", request_id)
            message = exc.message if hasattr(exc, "message") else f"{type(exc).__name__}"
            delivery = exc.delivery if isinstance(exc, JobError) else None
            if not self._ledger.fail(request_id, str(message), counters.as_dict(), delivery=delivery, attempt=attempt):
                return "lost"
            return "failed"

    def _run(self, request_id: str, attempt: int, lease: Lease, counters: Counters) -> str:
        row = self._ledger.load(request_id)
        if row.state != "running" or row.attempts != attempt:
            raise LeaseLost(f"request {request_id} is {row.state} (attempt {row.attempts}), not this attempt's")
        # the project registry may have changed since the approval (closed, a membership removed)
        if why := self._requests.still_grants(row):
            raise JobError(f"the export was not run: {why}")
        destination = json.loads(row.destination)
        if destination.get("kind") == DICOMWEB:
            return self._push.run(row, destination.get("name", ""), counters, attempt, lease)
        self._bundle.run(row, counters, attempt, lease)
        return "ready"

    def discard_leftovers(self, request_id: str, keep: set[str] | frozenset[str] = frozenset()) -> int:
        """What attempts of a request that never finished left in the bundles directory, removed
        (:meth:`BundleDelivery.discard_leftovers`)."""
        return self._bundle.discard_leftovers(request_id, keep)
