"""The lifecycle of export requests: a researcher asks, a data steward decides, the approval is
dispatched to the task queue; and what the API shows of a request.

- only a data steward approves or rejects (the route's permission check, ``exports:request:approve``);
- the requester never approves their own export request (:class:`SelfApprovalRefused`, audited 110113);
- every transition is a guarded ``UPDATE ... WHERE state = <expected>``, so two stewards deciding at
  once cannot both succeed (the loser gets 409);
- a request names a registered project its requester belongs to (``projects.ProjectRegistry``): anyone
  else is refused (:class:`ProjectAccessDenied`, audited 110113) with the same answer whether the project
  exists or not; how the requester belongs is recorded, and an approval (and the job) needs it to still
  be registered for an open project;
- a request names its destination from the server's allow-list (``destinations.DestinationRegistry``),
  never a URL, and one restricted to other projects is refused (audited 110113);
- an approval is never lost to the task queue: the approved row is committed first and is the truth,
  the queue is told afterwards, and what the queue did not accept is dispatched again by the sweep.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from compliance.audit.codes import Action
from compliance.audit.message import UserRef
from compliance.db.session import rows_matched
from compliance.deid.profiles import load_profile
from compliance.dicomweb.routing import is_uid
from compliance.errors import ComplianceError
from compliance.exports.audit import EXPORT_REQUEST_URN, ExportAudit
from compliance.exports.delivery_log import DeliveryLog
from compliance.exports.destinations import BUNDLE, DICOMWEB, DestinationRegistry
from compliance.exports.interfaces import (
    DestinationNotAllowed,
    ExportNotFound,
    ExportQueue,
    ExportStateConflict,
    InvalidExportRequest,
    SelfApprovalRefused,
)
from compliance.exports.models import ExportRequest
from compliance.exports.projects import ProjectRefused, ProjectRegistry
from compliance.exports.recovery import RecoveryPolicy, dispatch_due
from compliance.exports.rows import iso

log = logging.getLogger(__name__)

_MAX_STUDIES = 10_000
_QIDO_FILTER_KEYS = frozenset({"PatientID", "StudyDate", "ModalitiesInStudy", "AccessionNumber", "StudyDescription",
                               "StudyInstanceUID", "00100020", "00080020", "00080061", "00080050", "0020000D"})


@dataclass(frozen=True)
class NewExport:
    project: str
    protocol: str
    purpose: str
    profile: str
    study_uids: tuple[str, ...] = ()
    filters: dict[str, str] | None = None
    #: "bundle", or {"kind": "dicomweb", "name": <a destination of the allow-list>}
    destination: str | Mapping[str, object] = BUNDLE


def request_status(row: ExportRequest) -> dict[str, object]:
    """A request as its row holds it: state, cohort, destination, decision, progress, bundle or delivery."""
    percent = 100.0 if row.state == "ready" else (
        round(100.0 * row.processed / row.total, 1) if row.total else 0.0)
    return {
        "id": row.id, "state": row.state, "project": row.project, "protocol": row.protocol,
        "purpose": row.purpose, "profile": row.profile, "cohort": json.loads(row.cohort),
        "destination": json.loads(row.destination),
        "requester": {"id": row.requester_id, "username": row.requester_name,
                      "membership": row.requester_membership},
        "approver": {"id": row.approver_id, "username": row.approver_name} if row.approver_id else None,
        "comment": row.decision_comment,
        "created_at": iso(row.created_at), "decided_at": iso(row.decided_at), "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at), "expires_at": iso(row.expires_at),
        "progress": {"percent": percent, "total": row.total, "processed": row.processed,
                     "released": row.released, "held_back": row.held_back, "errors": row.errors},
        "checksum_sha256": row.checksum_sha256, "bundle_size": row.bundle_size, "error": row.error,
        "delivery": json.loads(row.delivery) if row.delivery else None,
        "attempts": row.attempts or 0, "dispatched_at": iso(row.dispatched_at),
    }


class ExportRequests:
    def __init__(self, sessions: sessionmaker[Session], audit: ExportAudit, delivery_log: DeliveryLog, *,
                 projects: ProjectRegistry, destinations: DestinationRegistry, queue: ExportQueue | None,
                 recovery: RecoveryPolicy, clock: Callable[[], datetime]) -> None:
        self._sessions = sessions
        self._audit = audit
        self._delivery_log = delivery_log
        #: No registry: no project is registered, every request is refused.
        self.projects = projects
        self.destinations = destinations
        self.queue = queue
        self.recovery = recovery
        self._clock = clock

    def present(self, row: ExportRequest) -> dict[str, object]:
        """A request as the API shows it: with its project as registered (title, protocols, members)."""
        return {**request_status(row), "project_registration": self.projects.describe(row.project)}

    def still_grants(self, row: ExportRequest) -> str | None:
        """Why the request's project no longer grants it (closed, the membership removed), else None."""
        return self.projects.still_grants(row.project, row.requester_membership)

    # -- researcher ----------------------------------------------------------------------------
    def create(self, user: UserRef, new: NewExport, *, groups: Collection[str] = ()) -> dict[str, object]:
        """A new request of ``user``, whose token's ``groups`` (and username) must make them a member of
        the registered project named; nothing is stored otherwise."""
        for name, value, limit in (("project", new.project, 64), ("protocol", new.protocol, 128),
                                   ("purpose", new.purpose, 256)):
            if not value.strip() or len(value) > limit:
                raise InvalidExportRequest(f"{name} must be 1..{limit} characters")
        try:  # first: a non-member learns nothing more about the project (not even its protocols)
            project, membership = self.projects.authorize(new.project, user.username or "", groups)
        except ProjectRefused as refused:
            self._audit.refused(user, new.project,
                                f"refused export request for project {new.project!r}: {refused.reason}")
            raise refused.denial() from None
        if project.protocols and new.protocol not in project.protocols:
            raise InvalidExportRequest(f"project {project.id!r} runs under protocol {' or '.join(project.protocols)}; "
                                       "the request must cite it")
        try:
            destination = self.destinations.resolve(new.destination, project.id)
        except DestinationNotAllowed as exc:
            self._audit.refused(user, project.id, f"refused export request for project {project.id!r}: {exc.message}")
            raise
        try:
            load_profile(new.profile)
        except ComplianceError as exc:
            raise InvalidExportRequest(f"unknown de-identification profile {new.profile!r}") from exc
        if bool(new.study_uids) == bool(new.filters):
            raise InvalidExportRequest("the cohort is either study_uids or QIDO-RS filters (exactly one)")
        if len(new.study_uids) > _MAX_STUDIES:
            raise InvalidExportRequest(f"at most {_MAX_STUDIES} studies per request")
        for uid in new.study_uids:
            if not is_uid(uid):  # str.isdigit() would take other scripts' digits ("\u0663")
                raise InvalidExportRequest("study_uids must be DICOM UIDs")
        if new.filters and not set(new.filters) <= _QIDO_FILTER_KEYS:
            raise InvalidExportRequest(f"allowed QIDO-RS filters: {sorted(_QIDO_FILTER_KEYS)}")
        cohort = {"study_uids": list(new.study_uids)} if new.study_uids else {"filters": dict(new.filters or {})}
        row = ExportRequest(
            id=str(uuid.uuid4()), state="requested", project=new.project, protocol=new.protocol,
            purpose=new.purpose, profile=new.profile, cohort=json.dumps(cohort, sort_keys=True),
            destination=json.dumps(destination, sort_keys=True), requester_id=user.user_id,
            requester_name=user.username or user.user_id, requester_membership=membership, created_at=self._clock(),
            total=0, processed=0, released=0, held_back=0, errors=0,
        )
        with self._sessions() as session, session.begin():
            session.add(row)
        self._audit.step(user, row, Action.CREATE, "requested")
        return self.present(row)

    def get(self, request_id: str, *, reader_id: str, may_read_all: bool) -> dict[str, object]:
        with self._sessions() as session:
            row = session.get(ExportRequest, request_id)
            # Another researcher's request is "not found", not "forbidden": ids are not disclosed.
            if row is None or not (may_read_all or row.requester_id == reader_id):
                raise ExportNotFound("no such export request")
            return self._shown(session, row)

    def _shown(self, session: Session, row: ExportRequest) -> dict[str, object]:
        """:meth:`present`, with a running or stopped push's delivery as its log holds it so far."""
        shown = self.present(row)
        if shown["delivery"] is None and json.loads(row.destination).get("kind") == DICOMWEB \
                and row.state != "requested":
            shown["delivery"] = self._delivery_log.live(session, row)
        return shown

    def list(self, *, reader_id: str, may_read_all: bool, state: str | None = None) -> list[dict[str, object]]:
        with self._sessions() as session:
            q = select(ExportRequest).order_by(ExportRequest.created_at.desc()).limit(500)
            if not may_read_all:
                q = q.where(ExportRequest.requester_id == reader_id)
            if state:
                q = q.where(ExportRequest.state == state)
            return [self._shown(session, r) for r in session.scalars(q)]

    # -- data steward --------------------------------------------------------------------------
    def decide(self, request_id: str, steward: UserRef, *, approve: bool, comment: str) -> dict[str, object]:
        if not comment.strip():
            raise InvalidExportRequest("a comment is required")
        with self._sessions() as session:
            row = session.get(ExportRequest, request_id)
            if row is None:
                raise ExportNotFound("no such export request")
            if row.requester_id == steward.user_id:
                self._audit.denied(steward, EXPORT_REQUEST_URN + request_id,
                                   f"refused self-{'approval' if approve else 'rejection'} of export request "
                                   f"{request_id}: the requester cannot decide their own request")
                raise SelfApprovalRefused("the requester of an export cannot approve or reject it")
            if approve and row.state == "requested" and (why := self.still_grants(row)):
                self._audit.refused(steward, row.project, f"refused approval of export request {request_id}: {why}")
                raise ExportStateConflict(f"the request cannot be approved: {why}")
        new_state = "approved" if approve else "rejected"
        now = self._clock()
        with self._sessions() as session, session.begin():
            done = rows_matched(session.execute(
                update(ExportRequest).where(ExportRequest.id == request_id, ExportRequest.state == "requested",
                                            ExportRequest.requester_id != steward.user_id)
                .values(state=new_state, approver_id=steward.user_id,
                        approver_name=steward.username or steward.user_id, decision_comment=comment,
                        decided_at=now)))
        with self._sessions() as session:
            row = session.get(ExportRequest, request_id)
            assert row is not None
        if not done:
            raise ExportStateConflict(f"the export request is {row.state}, not requested")
        self._audit.step(steward, row, Action.UPDATE, new_state)
        if not approve:
            return self.present(row)
        # The approval is committed and audited: whatever the queue does now, it stands.
        try:
            dispatch = self.dispatch(request_id)
        except Exception as exc:  # e.g. the database failed between the commit and the dispatch
            log.exception("export %s: approved, but its dispatch failed; the sweep will dispatch it", request_id)
            dispatch = {"status": "pending", "detail": f"the approval is recorded; the job could not be dispatched "
                                                       f"now ({type(exc).__name__}) and will be automatically"}
        with self._sessions() as session:
            row = session.get(ExportRequest, request_id)
            assert row is not None
            return {**self.present(row), "dispatch": dispatch}

    # -- dispatch (the approved row is the outbox; the queue is told after the commit) ----------
    def dispatch(self, request_id: str, *, sweep: bool = False) -> dict[str, str]:
        """Hand an approved request to the task queue; never raises (the approval stands regardless).

        ``dispatched_at`` is set by a guarded UPDATE first (so two sweeps never send one request
        twice), and cleared again if the queue refuses, so the sweep tries later. From the approval:
        only a request never dispatched; from the sweep: only one :func:`dispatch_due` says is due.
        """
        if self.queue is None:
            return {"status": "pending", "detail": "the approval is recorded; this gateway runs no export jobs, "
                                                   "a worker of the deployment will claim it"}
        now = self._clock()
        policy = self.recovery
        due: ColumnElement[bool] = ExportRequest.dispatched_at.is_(None)
        if sweep:
            due = or_(and_(ExportRequest.dispatched_at.is_(None),
                           or_(ExportRequest.decided_at.is_(None),
                               ExportRequest.decided_at <= now - timedelta(seconds=policy.dispatch_grace_seconds))),
                      ExportRequest.dispatched_at <= now - timedelta(seconds=policy.redispatch_after_seconds))
        with self._sessions() as session, session.begin():
            taken = rows_matched(session.execute(update(ExportRequest).where(
                ExportRequest.id == request_id, ExportRequest.state == "approved", due)
                .values(dispatched_at=now)))
        if not taken:  # another gateway or a sweep dispatched it, or a worker already claimed it
            return {"status": "dispatched" if not sweep else "skipped",
                    "detail": "already dispatched, or already picked up by a worker"}
        try:
            self.queue.enqueue(request_id)
        except Exception as exc:
            log.warning("export %s: the %s queue did not accept the job (%s: %s); the sweep will dispatch it",
                        request_id, self.queue.name, type(exc).__name__, exc)
            with self._sessions() as session, session.begin():
                session.execute(update(ExportRequest).where(ExportRequest.id == request_id,
                                                            ExportRequest.state == "approved")
                                .values(dispatched_at=None))
            return {"status": "pending",
                    "detail": f"the approval is recorded; the job queue ({self.queue.name}) could not be reached "
                              f"({type(exc).__name__}), so the job will be dispatched automatically once it can be"}
        return {"status": "dispatched", "detail": f"handed to the {self.queue.name} job queue"}

    def dispatch_due(self, limit: int = 100) -> int:
        """The sweep's dispatch: approved requests the queue never accepted, or whose message was lost."""
        if self.queue is None:
            return 0
        now = self._clock()
        with self._sessions() as session:
            rows = session.execute(select(ExportRequest.id, ExportRequest.decided_at, ExportRequest.dispatched_at)
                                   .where(ExportRequest.state == "approved")
                                   .order_by(ExportRequest.decided_at).limit(limit)).all()
        sent = 0
        for request_id, decided_at, dispatched_at in rows:
            due = dispatch_due(decided_at=decided_at, dispatched_at=dispatched_at, now=now, policy=self.recovery)
            if due and self.dispatch(request_id, sweep=True)["status"] == "dispatched":
                sent += 1
        return sent
