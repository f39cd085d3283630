"""Export requests, as the API, the workers and the jobs use them: one object over the request
lifecycle, the job ledger, the delivery log and the bundle store, sharing a database, an audit trail
and a clock.

Invariants (also enforced by the database where it can: ``ck_export_request_not_self_approved``,
``ck_export_reidentification_second_person``):

- only a data steward approves or rejects (the route's permission check, ``exports:request:approve``);
- the requester never approves their own export request (:class:`SelfApprovalRefused`, audited 110113);
- a re-identification needs a data steward to ask and a DIFFERENT data steward to approve; only the
  one who asked may reveal, and only once (:mod:`compliance.exports.reidentification`);
- every transition is a guarded ``UPDATE ... WHERE state = <expected>``, so two stewards deciding at
  once, or two workers claiming one job, cannot both succeed (the loser gets 409 / nothing);
- the bundle is served to its requester only, while ``ready`` and before ``expires_at``
  (:mod:`compliance.exports.bundles`);
- a request names a registered project its requester belongs to (``projects.ProjectRegistry``): anyone
  else is refused (:class:`ProjectAccessDenied`, audited 110113) with the same answer whether the project
  exists or not; how the requester belongs is recorded, and an approval (and the job) needs it to still
  be registered for an open project (:mod:`compliance.exports.requests`);
- a request names its destination from the server's allow-list (``destinations.DestinationRegistry``),
  never a URL, and one restricted to other projects is refused (audited 110113); a push to a DICOMweb
  destination has no bundle, its status carries the per-file delivery (:mod:`compliance.exports.delivery_log`);
- an approval is never lost to the task queue: the approved row is committed first and is the truth,
  the queue is told afterwards, and what the queue did not accept is dispatched again by the sweep;
- a running job holds a lease and a fencing token (``attempts``): every write of the job is guarded by
  both, and the sweep requeues (or, after too many attempts, fails) a request whose lease expired
  (:mod:`compliance.exports.ledger`). See :mod:`compliance.exports.recovery`.

Audit mapping: see :mod:`compliance.exports.audit`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from compliance.audit.recorder import AuditRecorder
from compliance.exports.audit import ExportAudit
from compliance.exports.bundles import BundleStore
from compliance.exports.delivery_log import DeliveryLog
from compliance.exports.destinations import DestinationRegistry
from compliance.exports.interfaces import ExportQueue
from compliance.exports.keys import ProjectKeyStore
from compliance.exports.ledger import JobLedger
from compliance.exports.projects import ProjectRegistry
from compliance.exports.recovery import RecoveryPolicy
from compliance.exports.requests import ExportRequests
from compliance.exports.rows import utcnow


class ExportService:
    def __init__(self, sessions: sessionmaker[Session], auditor: AuditRecorder, keys: ProjectKeyStore, *,
                 gateway_id: str, queue: ExportQueue | None = None, bundle_ttl: timedelta = timedelta(days=7),
                 clock: Callable[[], datetime] = utcnow, destinations: DestinationRegistry | None = None,
                 recovery: RecoveryPolicy | None = None, projects: ProjectRegistry | None = None) -> None:
        """``projects`` None: no project is registered, every request is refused; ``destinations`` None:
        bundles only."""
        self.keys = keys
        self.gateway_id = gateway_id
        recovery = recovery or RecoveryPolicy()
        audit = ExportAudit(auditor, gateway_id)
        self.ledger = JobLedger(sessions, audit, keys, recovery=recovery, bundle_ttl=bundle_ttl, clock=clock)
        self.delivery_log = DeliveryLog(sessions, recovery=recovery, clock=clock)
        self.bundles = BundleStore(sessions, audit, keys, clock=clock)
        self.requests = ExportRequests(sessions, audit, self.delivery_log, projects=projects or ProjectRegistry(),
                                       destinations=destinations or DestinationRegistry(), queue=queue,
                                       recovery=recovery, clock=clock)
        # What the API and the workers call, each the method of the part that does it.
        self.create = self.requests.create
        self.get = self.requests.get
        self.list = self.requests.list
        self.decide = self.requests.decide
        self.dispatch_due = self.requests.dispatch_due
        self.open_bundle = self.bundles.open_bundle
        self.expire_due = self.bundles.expire_due
        self.load = self.ledger.load
        self.claimable = self.ledger.claimable
        self.claim = self.ledger.claim
        self.renew_lease = self.ledger.renew_lease
        self.progress = self.ledger.progress
        self.fail = self.ledger.fail
        self.recover_expired = self.ledger.recover_expired

    @property
    def projects(self) -> ProjectRegistry:
        return self.requests.projects

    @property
    def destinations(self) -> DestinationRegistry:
        return self.requests.destinations

    @property
    def queue(self) -> ExportQueue | None:
        return self.requests.queue

    @property
    def recovery(self) -> RecoveryPolicy:
        return self.ledger.recovery
