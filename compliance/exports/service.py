"""State transitions of export and re-identification requests, with their invariants and audit.

Invariants (also enforced by the database where it can: ``ck_export_request_not_self_approved``,
``ck_export_reidentification_second_person``):

- only a data steward approves or rejects (the route's permission check, ``exports:request:approve``);
- the requester never approves their own export request (:class:`SelfApprovalRefused`, audited 110113);
- a re-identification needs a data steward to ask and a DIFFERENT data steward to approve; only the
  one who asked may reveal, and only once;
- every transition is a guarded ``UPDATE ... WHERE state = <expected>``, so two stewards deciding at
  once, or two workers claiming one job, cannot both succeed (the loser gets 409 / nothing);
- the bundle is served to its requester only, while ``ready`` and before ``expires_at``;
- a request names a registered project its requester belongs to (``projects.ProjectRegistry``): anyone
  else is refused (:class:`ProjectAccessDenied`, audited 110113) with the same answer whether the project
  exists or not; how the requester belongs is recorded, and an approval (and the job) needs it to still
  be registered for an open project;
- a request names its destination from the server's allow-list (``destinations.DestinationRegistry``),
  never a URL, and one restricted to other projects is refused (audited 110113); a push to a DICOMweb
  destination has no bundle, its status carries the per-file delivery;
- an approval is never lost to the task queue: the approved row is committed first and is the truth,
  the queue is told afterwards, and what the queue did not accept is dispatched again by the sweep;
- a running job holds a lease and a fencing token (``attempts``): every write of the job is guarded by
  both, and the sweep requeues (or, after too many attempts, fails) a request whose lease expired.
  See :mod:`compliance.exports.recovery`.

Audit mapping: see :mod:`compliance.exports.audit`.
"""

from __future__ import annotations

import builtins
import json
import logging
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, and_, delete, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from compliance.audit.codes import Action, EventTypeCode, Outcome
from compliance.audit.events import export_event, security_alert_event
from compliance.audit.message import PatientRef, StudyRef, UserRef
from compliance.audit.recorder import AuditRecorder
from compliance.crypto.aead import open_sealed, seal
from compliance.crypto.streaming import iter_decrypt
from compliance.deid.profiles import load_profile
from compliance.dicomweb.routing import is_uid
from compliance.errors import ComplianceError
from compliance.exports.audit import EXPORT_REQUEST_URN, export_request_event, reidentification_event
from compliance.exports.destinations import BUNDLE, DICOMWEB, DestinationRegistry
from compliance.exports.interfaces import (
    PSEUDONYM_KINDS,
    BundleExpired,
    DestinationNotAllowed,
    ExportNotFound,
    ExportQueue,
    ExportStateConflict,
    InvalidExportRequest,
    SelfApprovalRefused,
)
from compliance.exports.keys import ProjectKeyStore, PseudonymMap
from compliance.exports.models import ExportDeliveryFile, ExportPseudonym, ExportReidentification, ExportRequest
from compliance.exports.projects import ProjectRefused, ProjectRegistry
from compliance.exports.recovery import RecoveryPolicy, dispatch_due, interrupted_reason, running_decision

log = logging.getLogger(__name__)

#: The resource of a refused project in a 110113 (the name the caller gave, registered or not).
PROJECT_URN = "urn:compliance:research-project:"
_MAX_STUDIES = 10_000
_QIDO_FILTER_KEYS = frozenset({"PatientID", "StudyDate", "ModalitiesInStudy", "AccessionNumber", "StudyDescription",
                               "StudyInstanceUID", "00100020", "00080020", "00080061", "00080050", "0020000D"})


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes for timezone-aware columns; they were written in UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _iso(value: datetime | None) -> str | None:
    value = _aware(value)
    return value.isoformat() if value is not None else None


def _rowcount(result: object) -> int:
    """The rows an UPDATE matched: ``Session.execute`` returns a CursorResult for it (typed as a plain Result)."""
    return cast(CursorResult[Any], result).rowcount


def disclosure_aad(request_id: str) -> bytes:
    return b"export disclosure v1\x00" + request_id.encode()


@dataclass(frozen=True)
class NewExport:
    project: str
    protocol: str
    purpose: str
    profile: str
    study_uids: tuple[str, ...] = ()
    filters: dict[str, str] | None = None
    #: "bundle", or {"kind": "dicomweb", "name": <a destination of the allow-list>}
    destination: str | dict[str, Any] = BUNDLE


@dataclass(frozen=True)
class Bundle:
    chunks: Iterator[bytes]
    size: int
    checksum_sha256: str
    filename: str


def view(row: ExportRequest) -> dict[str, Any]:
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
        "created_at": _iso(row.created_at), "decided_at": _iso(row.decided_at), "started_at": _iso(row.started_at),
        "finished_at": _iso(row.finished_at), "expires_at": _iso(row.expires_at),
        "progress": {"percent": percent, "total": row.total, "processed": row.processed,
                     "released": row.released, "held_back": row.held_back, "errors": row.errors},
        "checksum_sha256": row.checksum_sha256, "bundle_size": row.bundle_size, "error": row.error,
        "delivery": json.loads(row.delivery) if row.delivery else None,
        "attempts": row.attempts or 0, "dispatched_at": _iso(row.dispatched_at),
    }


def live_delivery(row: ExportRequest, files: list[ExportDeliveryFile]) -> dict[str, Any]:
    """A push's delivery as recorded batch by batch (``export_delivery_file``), before (or without) its end.

    What a request shows while its job runs, and after a job that was killed: which files the
    destination stored, refused, or has not answered for (``sending``: the batch was on its way).
    """
    counts = {status: 0 for status in ("stored", "failed", "unconfirmed", "sending")}
    out_files = []
    for f in sorted(files, key=lambda f: (f.instance, f.sop_instance_uid)):
        counts[f.status] += 1
        entry: dict[str, Any] = {"instance": f.instance, "sop_instance_uid": f.sop_instance_uid, "status": f.status,
                                 "attempt": f.attempt}
        if f.reason:
            entry["reason"] = f.reason
        out_files.append(entry)
    dest = json.loads(row.destination)
    return {"destination": {"name": dest.get("name"), "kind": dest.get("kind")}, "recorded": "per batch",
            "in_progress": row.state == "running", **counts, "files": out_files}


class ExportService:
    def __init__(self, sessions: sessionmaker[Session], auditor: AuditRecorder, keys: ProjectKeyStore, *,
                 gateway_id: str, queue: ExportQueue | None = None, bundle_ttl: timedelta = timedelta(days=7),
                 clock: Callable[[], datetime] = _utcnow, destinations: DestinationRegistry | None = None,
                 recovery: RecoveryPolicy | None = None, projects: ProjectRegistry | None = None) -> None:
        self.destinations = destinations or DestinationRegistry()
        #: No registry: no project is registered, every request is refused.
        self.projects = projects or ProjectRegistry()
        self.recovery = recovery or RecoveryPolicy()
        self._sessions = sessions
        self._auditor = auditor
        self.keys = keys
        self.gateway_id = gateway_id
        self.queue = queue
        self.bundle_ttl = bundle_ttl
        self._clock = clock

    # -- audit ---------------------------------------------------------------------------------
    def _order(self, user: UserRef | None, row: ExportRequest, action: Action, step: str,
               outcome: Outcome = Outcome.SUCCESS, description: str | None = None) -> None:
        self._auditor.record_now(export_request_event(
            user=user, gateway_id=self.gateway_id, request_id=row.id, action=action, step=step, outcome=outcome,
            description=description,
            details={"Project": row.project, "Protocol": row.protocol, "Purpose": row.purpose, "Profile": row.profile,
                     "Destination": _destination_label(row), "State": row.state, "Requester": row.requester_name,
                     "Membership": row.requester_membership, "Comment": row.decision_comment}))

    def _refused(self, user: UserRef, project: str, description: str) -> None:
        """A refused access decision about a project: 110113, as every denial of the export domain."""
        self._auditor.record_now(security_alert_event(
            user=user, gateway_id=self.gateway_id, alert_type=EventTypeCode.ACCESS_CONTROL_DECISION,
            description=description, resource=PROJECT_URN + project, outcome=Outcome.MINOR_FAILURE))

    def present(self, row: ExportRequest) -> dict[str, Any]:
        """A request as the API shows it: with its project as registered (title, protocols, members)."""
        return {**view(row), "project_registration": self.projects.describe(row.project)}

    # -- researcher ----------------------------------------------------------------------------
    def create(self, user: UserRef, new: NewExport, *, groups: Collection[str] = ()) -> dict[str, Any]:
        """A new request of ``user``, whose token's ``groups`` (and username) must make them a member of
        the registered project named; nothing is stored otherwise."""
        for name, value, limit in (("project", new.project, 64), ("protocol", new.protocol, 128),
                                   ("purpose", new.purpose, 256)):
            if not value.strip() or len(value) > limit:
                raise InvalidExportRequest(f"{name} must be 1..{limit} characters")
        try:  # first: a non-member learns nothing more about the project (not even its protocols)
            project, membership = self.projects.authorize(new.project, user.username or "", groups)
        except ProjectRefused as refused:
            self._refused(user, new.project, f"refused export request for project {new.project!r}: {refused.reason}")
            raise refused.denial() from None
        if project.protocols and new.protocol not in project.protocols:
            raise InvalidExportRequest(f"project {project.id!r} runs under protocol {' or '.join(project.protocols)}; "
                                       "the request must cite it")
        try:
            destination = self.destinations.resolve(new.destination, project.id)
        except DestinationNotAllowed as exc:
            self._refused(user, project.id, f"refused export request for project {project.id!r}: {exc.message}")
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
        self._order(user, row, Action.CREATE, "requested")
        return self.present(row)

    def get(self, request_id: str, *, reader_id: str, may_read_all: bool) -> dict[str, Any]:
        with self._sessions() as session:
            row = session.get(ExportRequest, request_id)
            # Another researcher's request is "not found", not "forbidden": ids are not disclosed.
            if row is None or not (may_read_all or row.requester_id == reader_id):
                raise ExportNotFound("no such export request")
            return self._view(session, row)

    def _view(self, session: Session, row: ExportRequest) -> dict[str, Any]:
        out = self.present(row)
        if out["delivery"] is None and out["destination"].get("kind") == DICOMWEB and row.state != "requested":
            files = list(session.scalars(select(ExportDeliveryFile).where(ExportDeliveryFile.request_id == row.id)))
            if files:
                out["delivery"] = live_delivery(row, files)
        return out

    def list(self, *, reader_id: str, may_read_all: bool, state: str | None = None) -> list[dict[str, Any]]:
        with self._sessions() as session:
            q = select(ExportRequest).order_by(ExportRequest.created_at.desc()).limit(500)
            if not may_read_all:
                q = q.where(ExportRequest.requester_id == reader_id)
            if state:
                q = q.where(ExportRequest.state == state)
            return [self._view(session, r) for r in session.scalars(q)]

    # -- data steward --------------------------------------------------------------------------
    def decide(self, request_id: str, steward: UserRef, *, approve: bool, comment: str) -> dict[str, Any]:
        if not comment.strip():
            raise InvalidExportRequest("a comment is required")
        with self._sessions() as session:
            row = session.get(ExportRequest, request_id)
            if row is None:
                raise ExportNotFound("no such export request")
            if row.requester_id == steward.user_id:
                self._auditor.record_now(security_alert_event(
                    user=steward, gateway_id=self.gateway_id, alert_type=EventTypeCode.ACCESS_CONTROL_DECISION,
                    description=f"refused self-{'approval' if approve else 'rejection'} of export request "
                                f"{request_id}: the requester cannot decide their own request",
                    resource=EXPORT_REQUEST_URN + request_id, outcome=Outcome.MINOR_FAILURE))
                raise SelfApprovalRefused("the requester of an export cannot approve or reject it")
            if approve and row.state == "requested" and (
                    why := self.projects.still_grants(row.project, row.requester_membership)):
                self._refused(steward, row.project, f"refused approval of export request {request_id}: {why}")
                raise ExportStateConflict(f"the request cannot be approved: {why}")
        new_state = "approved" if approve else "rejected"
        now = self._clock()
        with self._sessions() as session, session.begin():
            done = _rowcount(session.execute(
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
        self._order(steward, row, Action.UPDATE, new_state)
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
            taken = _rowcount(session.execute(update(ExportRequest).where(
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

    # -- workers -------------------------------------------------------------------------------
    def claimable(self, limit: int = 10) -> builtins.list[str]:
        with self._sessions() as session, session.begin():
            q = select(ExportRequest.id).where(ExportRequest.state == "approved").order_by(
                ExportRequest.decided_at).limit(limit)
            if session.get_bind().dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)
            return list(session.scalars(q))

    def claim(self, request_id: str, worker: str) -> int | None:
        """approved -> running, for exactly one worker (a guarded UPDATE on every database).

        Returns the attempt number (the fencing token of this run, 1 for the first), or None when
        another worker has the request (or it is no longer approved).
        """
        now = self._clock()
        with self._sessions() as session, session.begin():
            done = _rowcount(session.execute(
                update(ExportRequest).where(ExportRequest.id == request_id, ExportRequest.state == "approved")
                .values(state="running", worker=worker[:128], started_at=now, attempts=ExportRequest.attempts + 1,
                        lease_expires_at=self.recovery.lease_until(now))))
        if not done:
            return None
        row = self._row(request_id)
        attempt = row.attempts
        suffix = f" (attempt {attempt} of {self.recovery.max_attempts})" if attempt > 1 else ""
        self._order(None, row, Action.UPDATE, "running", description=f"export job started on {worker}{suffix}")
        return attempt

    def _fence(self, request_id: str, attempt: int | None) -> builtins.list[Any]:
        """The guard of every write of a running job: still running, and still this attempt's."""
        guard = [ExportRequest.id == request_id, ExportRequest.state == "running"]
        if attempt is not None:
            guard.append(ExportRequest.attempts == attempt)
        return guard

    def renew_lease(self, request_id: str, attempt: int) -> bool:
        """Extend the running attempt's lease; False when the request is no longer this attempt's."""
        with self._sessions() as session, session.begin():
            return bool(_rowcount(session.execute(update(ExportRequest).where(*self._fence(request_id, attempt))
                                                  .values(lease_expires_at=self.recovery.lease_until(self._clock())))))

    def owns(self, request_id: str, attempt: int) -> bool:
        with self._sessions() as session:
            return session.scalar(select(ExportRequest.id).where(*self._fence(request_id, attempt))) is not None

    # -- recovery (the sweep) ------------------------------------------------------------------
    def recover_expired(self) -> dict[str, builtins.list[str]]:
        """Running requests whose lease expired: back to approved (requeued), or failed after max attempts."""
        now = self._clock()
        policy = self.recovery
        with self._sessions() as session:
            rows = session.execute(select(ExportRequest.id, ExportRequest.attempts, ExportRequest.lease_expires_at,
                                          ExportRequest.started_at, ExportRequest.worker)
                                   .where(ExportRequest.state == "running")).all()
        out: dict[str, list[str]] = {"requeued": [], "failed": []}
        for request_id, attempts, lease, started, worker in rows:
            decision = running_decision(attempts=attempts, lease_expires_at=lease, started_at=started, now=now,
                                        policy=policy)
            if decision == "keep":
                continue
            # guarded: still running, still that attempt, and its lease not renewed meanwhile
            unrenewed = (ExportRequest.lease_expires_at.is_(None) if lease is None
                         else ExportRequest.lease_expires_at <= now)
            guard = [*self._fence(request_id, attempts), unrenewed]
            lost = (f"export job attempt {attempts} on {worker or 'an unknown worker'} stopped renewing its lease "
                    f"(expired {_iso(lease) or 'unknown'})")
            if decision == "requeue":
                with self._sessions() as session, session.begin():
                    done = _rowcount(session.execute(update(ExportRequest).where(*guard).values(
                        state="approved", lease_expires_at=None, dispatched_at=None)))
                if done:
                    out["requeued"].append(request_id)
                    self._order(None, self._row(request_id), Action.UPDATE, "requeued", outcome=Outcome.MINOR_FAILURE,
                                description=f"{lost}; queued again for attempt {attempts + 1} of "
                                            f"{policy.max_attempts}")
                continue
            reason = interrupted_reason(attempts)
            with self._sessions() as session, session.begin():
                done = _rowcount(session.execute(update(ExportRequest).where(*guard).values(
                    state="failed", finished_at=now, lease_expires_at=None, error=reason)))
                if done:
                    # a batch on its way when the last attempt died: its outcome is unknown (it may be stored)
                    session.execute(update(ExportDeliveryFile).where(
                        ExportDeliveryFile.request_id == request_id, ExportDeliveryFile.status == "sending").values(
                        status="unconfirmed", updated_at=now,
                        reason="the job was interrupted while this batch was being sent; the destination's answer "
                               "is unknown"))
            if done:
                out["failed"].append(request_id)
                self._order(None, self._row(request_id), Action.UPDATE, "failed", outcome=Outcome.SERIOUS_FAILURE,
                            description=f"{lost}; {reason}")
        return out

    # -- per-file delivery of a push (recorded as each batch leaves and as it is answered) ------
    def delivered_files(self, request_id: str) -> dict[str, ExportDeliveryFile]:
        with self._sessions() as session:
            return {f.sop_instance_uid: f for f in session.scalars(
                select(ExportDeliveryFile).where(ExportDeliveryFile.request_id == request_id))}

    def record_sending(self, request_id: str, attempt: int, batch: int, files: builtins.list[tuple[str, int]]) -> bool:
        """Before a batch leaves: its files are ``sending``; False (nothing written) if the attempt lost the request.

        Renews the lease in the same transaction: the fencing check and the record are one commit.
        """
        now = self._clock()
        with self._sessions() as session, session.begin():
            if not _rowcount(session.execute(update(ExportRequest).where(*self._fence(request_id, attempt))
                                             .values(lease_expires_at=self.recovery.lease_until(now)))):
                return False
            uids = [uid for uid, _ in files]
            session.execute(delete(ExportDeliveryFile).where(ExportDeliveryFile.request_id == request_id,
                                                             ExportDeliveryFile.sop_instance_uid.in_(uids)))
            session.add_all(ExportDeliveryFile(request_id=request_id, sop_instance_uid=uid, instance=instance,
                                               batch=batch, attempt=attempt, status="sending", updated_at=now)
                            for uid, instance in files)
        return True

    def record_outcomes(self, request_id: str, attempt: int, outcomes: dict[str, tuple[str, str | None]]) -> bool:
        """After a batch: what the destination answered, per file (guarded like every write of the job)."""
        now = self._clock()
        with self._sessions() as session, session.begin():
            if session.scalar(select(ExportRequest.id).where(*self._fence(request_id, attempt))) is None:
                return False
            for uid, (status, reason) in outcomes.items():
                session.execute(update(ExportDeliveryFile).where(
                    ExportDeliveryFile.request_id == request_id, ExportDeliveryFile.sop_instance_uid == uid,
                    ExportDeliveryFile.attempt == attempt).values(status=status, reason=reason, updated_at=now))
        return True

    def _row(self, request_id: str) -> ExportRequest:
        with self._sessions() as session:
            row = session.get(ExportRequest, request_id)
            if row is None:
                raise ExportNotFound("no such export request")
            return row

    def load(self, request_id: str) -> ExportRequest:
        return self._row(request_id)

    def progress(self, request_id: str, *, attempt: int | None = None, **counters: int) -> bool:
        with self._sessions() as session, session.begin():
            return bool(_rowcount(session.execute(update(ExportRequest).where(*self._fence(request_id, attempt))
                                                  .values(**counters))))

    def finish(self, request_id: str, *, bundle_path: Path, bundle_size: int, checksum: str,
               patients: builtins.list[dict[str, str | None]], studies: builtins.list[dict[str, Any]],
               counters: dict[str, int], attempt: int | None = None) -> bool:
        """running -> ready with the bundle; False (nothing changed) if the attempt no longer owns the request."""
        row = self._row(request_id)
        disclosure = json.dumps({"patients": patients, "studies": studies}, sort_keys=True).encode()
        sealed = seal(self.keys.key(row.project, "map"), disclosure, disclosure_aad(request_id))
        now = self._clock()
        with self._sessions() as session, session.begin():
            done = _rowcount(session.execute(update(ExportRequest).where(*self._fence(request_id, attempt)).values(
                state="ready", finished_at=now, expires_at=now + self.bundle_ttl, bundle_path=str(bundle_path),
                bundle_size=bundle_size, checksum_sha256=checksum, disclosure_sealed=sealed, lease_expires_at=None,
                **counters)))
        if done:
            self._order(None, self._row(request_id), Action.UPDATE, "ready")
        return bool(done)

    def finish_delivery(self, request_id: str, *, delivery: dict[str, Any],
                        patients: builtins.list[dict[str, str | None]], studies: builtins.list[dict[str, Any]],
                        counters: dict[str, int], attempt: int | None = None) -> bool:
        """A push to a DICOMweb destination ended with at least one instance stored: ready, no bundle."""
        row = self._row(request_id)
        disclosure = json.dumps({"patients": patients, "studies": studies}, sort_keys=True).encode()
        sealed = seal(self.keys.key(row.project, "map"), disclosure, disclosure_aad(request_id))
        partial = delivery["stored"] < delivery["released"]
        error = (f"partial delivery: {delivery['stored']} of {delivery['released']} released instances stored at "
                 f"{delivery['destination']['name']} (see delivery.files)") if partial else None
        with self._sessions() as session, session.begin():
            done = _rowcount(session.execute(update(ExportRequest).where(*self._fence(request_id, attempt)).values(
                state="ready", finished_at=self._clock(), disclosure_sealed=sealed, error=error,
                delivery=json.dumps(delivery, sort_keys=True), lease_expires_at=None, **counters)))
        if done:
            self._order(None, self._row(request_id), Action.UPDATE, "ready",
                        outcome=Outcome.MINOR_FAILURE if partial else Outcome.SUCCESS,
                        description=f"export delivered to {delivery['destination']['name']}: {delivery['stored']} "
                                    f"stored, {delivery['failed']} failed, {delivery['unconfirmed']} unconfirmed")
        return bool(done)

    def fail(self, request_id: str, error: str, counters: dict[str, int] | None = None,
             delivery: dict[str, Any] | None = None, *, attempt: int | None = None) -> bool:
        extra = {"delivery": json.dumps(delivery, sort_keys=True)} if delivery is not None else {}
        with self._sessions() as session, session.begin():
            done = _rowcount(session.execute(update(ExportRequest).where(*self._fence(request_id, attempt)).values(
                state="failed", finished_at=self._clock(), error=error[:2000], lease_expires_at=None,
                **(counters or {}), **extra)))
        if done:
            self._order(None, self._row(request_id), Action.UPDATE, "failed", outcome=Outcome.SERIOUS_FAILURE,
                        description=f"export job failed: {error[:500]}")
        return bool(done)

    def expire_due(self) -> int:
        """ready bundles past ``expires_at`` -> expired; the encrypted file is deleted."""
        now = self._clock()
        with self._sessions() as session:
            due = [(r.id, r.bundle_path) for r in session.scalars(
                select(ExportRequest).where(ExportRequest.state == "ready", ExportRequest.expires_at <= now))]
        expired = 0
        for request_id, path in due:
            with self._sessions() as session, session.begin():
                done = _rowcount(session.execute(update(ExportRequest).where(ExportRequest.id == request_id,
                                                                             ExportRequest.state == "ready")
                                                 .values(state="expired")))
            if done:
                if path:
                    Path(path).unlink(missing_ok=True)
                self._order(None, self._row(request_id), Action.UPDATE, "expired")
                expired += 1
        return expired

    # -- the bundle ----------------------------------------------------------------------------
    def open_bundle(self, request_id: str, user: UserRef, *, destination_uri: str) -> Bundle:
        """The requester's decrypted bundle, streamed; the 110106 Export is recorded before any byte."""
        row = self._row(request_id)
        if row.requester_id != user.user_id:
            raise ExportNotFound("no such export request")
        expires = _aware(row.expires_at)
        if json.loads(row.destination).get("kind") == DICOMWEB:
            raise ExportStateConflict(f"this export is delivered to {_destination_label(row)}; it has no bundle")
        if row.state == "expired" or (row.state == "ready" and expires is not None and expires <= self._clock()):
            raise BundleExpired("the bundle has expired")
        if row.state != "ready" or not row.bundle_path or row.disclosure_sealed is None:
            raise ExportStateConflict(f"the export request is {row.state}; the bundle is not ready")
        disclosure = json.loads(open_sealed(self.keys.key(row.project, "map"), row.disclosure_sealed,
                                            disclosure_aad(row.id)))
        path = Path(row.bundle_path)
        fh = path.open("rb")  # opened before the audit: a missing file fails before a disclosure is recorded
        self._auditor.record_now(export_event(
            user=user, recipient=user.username or user.user_id, purpose=row.purpose,
            patients=[PatientRef(p["id"], p.get("name")) for p in disclosure["patients"]],
            studies=[StudyRef(s["uid"], sop_classes=s.get("sop_classes", {})) for s in disclosure["studies"]],
            destination_uri=destination_uri, anonymized=True,
            outcome_description=f"research export {row.id} (project {row.project}, protocol {row.protocol}, "
                                f"profile {row.profile}) downloaded by its requester"))

        def chunks() -> Iterator[bytes]:
            with fh:
                yield from iter_decrypt(iter(lambda: fh.read(1 << 20), b""),
                                        unwrap=self.keys.unwrap_bundle_header,
                                        associated_data=bundle_aad(row.id))

        assert row.bundle_size is not None and row.checksum_sha256 is not None
        return Bundle(chunks(), row.bundle_size, row.checksum_sha256, f"export-{row.id}.zip")


def _destination_label(row: ExportRequest) -> str:
    dest = json.loads(row.destination)
    return f"{DICOMWEB}:{dest.get('name')}" if dest.get("kind") == DICOMWEB else BUNDLE


def bundle_aad(request_id: str) -> bytes:
    return b"export bundle v1\x00" + request_id.encode()


class ReidentificationService:
    """Dual control: steward A asks, a different steward B approves, A reveals once."""

    def __init__(self, sessions: sessionmaker[Session], auditor: AuditRecorder, pseudonyms: PseudonymMap, *,
                 gateway_id: str, clock: Callable[[], datetime] = _utcnow) -> None:
        self._sessions = sessions
        self._auditor = auditor
        self._map = pseudonyms
        self.gateway_id = gateway_id
        self._clock = clock

    def _event(self, user: UserRef, row: ExportReidentification, action: Action, step: str,
               patients: list[PatientRef] | None = None) -> None:
        self._auditor.record_now(reidentification_event(
            user=user, gateway_id=self.gateway_id, request_id=row.id, action=action, step=step,
            patients=patients or (),
            details={"Project": row.project, "Kind": row.kind, "Pseudonym": row.pseudonym, "Reason": row.reason,
                     "Requester": row.requester_name, "Approver": row.approver_name,
                     "Comment": row.decision_comment}))

    @staticmethod
    def view(row: ExportReidentification) -> dict[str, Any]:
        return {"id": row.id, "state": row.state, "project": row.project, "kind": row.kind,
                "pseudonym": row.pseudonym, "reason": row.reason,
                "requester": {"id": row.requester_id, "username": row.requester_name},
                "approver": {"id": row.approver_id, "username": row.approver_name} if row.approver_id else None,
                "comment": row.decision_comment, "created_at": _iso(row.created_at),
                "decided_at": _iso(row.decided_at), "revealed_at": _iso(row.revealed_at)}

    def request(self, user: UserRef, *, project: str, kind: str, pseudonym: str, reason: str) -> dict[str, Any]:
        if kind not in PSEUDONYM_KINDS:
            raise InvalidExportRequest(f"kind must be one of {list(PSEUDONYM_KINDS)}")
        if not reason.strip():
            raise InvalidExportRequest("a reason is required")
        with self._sessions() as session:
            if session.get(ExportPseudonym, (project, kind, pseudonym)) is None:
                raise ExportNotFound("no such pseudonym in the project's map")
        row = ExportReidentification(id=str(uuid.uuid4()), state="requested", project=project, kind=kind,
                                     pseudonym=pseudonym, reason=reason, requester_id=user.user_id,
                                     requester_name=user.username or user.user_id, created_at=self._clock())
        with self._sessions() as session, session.begin():
            session.add(row)
        self._event(user, row, Action.CREATE, "requested")
        return self.view(row)

    def _row(self, request_id: str) -> ExportReidentification:
        with self._sessions() as session:
            row = session.get(ExportReidentification, request_id)
            if row is None:
                raise ExportNotFound("no such re-identification request")
            return row

    def decide(self, request_id: str, steward: UserRef, *, approve: bool, comment: str) -> dict[str, Any]:
        if not comment.strip():
            raise InvalidExportRequest("a comment is required")
        row = self._row(request_id)
        if row.requester_id == steward.user_id:
            self._auditor.record_now(security_alert_event(
                user=steward, gateway_id=self.gateway_id, alert_type=EventTypeCode.ACCESS_CONTROL_DECISION,
                description=f"refused: the requester of re-identification {request_id} cannot be its second approver",
                resource=f"urn:compliance:reidentification:{request_id}", outcome=Outcome.MINOR_FAILURE))
            raise SelfApprovalRefused("re-identification needs a second, different data steward")
        new_state = "approved" if approve else "rejected"
        with self._sessions() as session, session.begin():
            done = _rowcount(session.execute(update(ExportReidentification).where(
                ExportReidentification.id == request_id, ExportReidentification.state == "requested",
                ExportReidentification.requester_id != steward.user_id).values(
                state=new_state, approver_id=steward.user_id, approver_name=steward.username or steward.user_id,
                decision_comment=comment, decided_at=self._clock())))
        row = self._row(request_id)
        if not done:
            raise ExportStateConflict(f"the re-identification request is {row.state}, not requested")
        self._event(steward, row, Action.UPDATE, new_state)
        return self.view(row)

    def reveal(self, request_id: str, user: UserRef) -> dict[str, Any]:
        row = self._row(request_id)
        if row.requester_id != user.user_id:
            raise ExportNotFound("no such re-identification request")
        if row.state != "approved":
            raise ExportStateConflict(f"the re-identification request is {row.state}; it reveals once, when approved")
        # looked up before the request is used up: a pseudonym the map does not hold (or a map that no
        # longer decrypts) leaves the approved request as it was
        original = self._map.lookup(row.project, row.kind, row.pseudonym)
        if original is None:
            raise ExportNotFound("no such pseudonym in the project's map")
        with self._sessions() as session, session.begin():
            done = _rowcount(session.execute(update(ExportReidentification).where(
                ExportReidentification.id == request_id, ExportReidentification.state == "approved",
                ExportReidentification.requester_id == user.user_id).values(
                state="revealed", revealed_at=self._clock())))
        if not done:
            raise ExportStateConflict("the re-identification request was revealed already; it reveals once")
        row = self._row(request_id)
        patients = [PatientRef(original)] if row.kind == "patient_id" else []
        self._event(user, row, Action.READ, "revealed", patients=patients)
        return {**self.view(row), "original": original}
