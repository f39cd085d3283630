"""Re-identification under dual control: a data steward asks for the original behind a pseudonym of a
project's map, a DIFFERENT data steward approves (``ck_export_reidentification_second_person``
holds it in the database too), and only the one who asked may reveal it, once.

Audit: 110110 Patient Record for each step (:func:`compliance.exports.audit.reidentification_event`),
110113 for a requester who tries to approve their own request.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from compliance.audit.codes import Action
from compliance.audit.message import PatientRef, UserRef
from compliance.audit.recorder import AuditRecorder
from compliance.db.session import rows_matched
from compliance.exports.audit import REID_REQUEST_URN, ExportAudit, reidentification_event
from compliance.exports.interfaces import (
    PSEUDONYM_KINDS,
    ExportNotFound,
    ExportStateConflict,
    InvalidExportRequest,
    SelfApprovalRefused,
)
from compliance.exports.keys import PseudonymMap
from compliance.exports.models import ExportPseudonym, ExportReidentification
from compliance.exports.rows import iso, utcnow


def reidentification_status(row: ExportReidentification) -> dict[str, object]:
    """A re-identification request as the API shows it (never the original: :meth:`reveal` adds it once)."""
    return {"id": row.id, "state": row.state, "project": row.project, "kind": row.kind,
            "pseudonym": row.pseudonym, "reason": row.reason,
            "requester": {"id": row.requester_id, "username": row.requester_name},
            "approver": {"id": row.approver_id, "username": row.approver_name} if row.approver_id else None,
            "comment": row.decision_comment, "created_at": iso(row.created_at),
            "decided_at": iso(row.decided_at), "revealed_at": iso(row.revealed_at)}


class ReidentificationService:
    """Dual control: steward A asks, a different steward B approves, A reveals once."""

    def __init__(self, sessions: sessionmaker[Session], auditor: AuditRecorder, pseudonyms: PseudonymMap, *,
                 gateway_id: str, clock: Callable[[], datetime] = utcnow) -> None:
        self._sessions = sessions
        self._audit = ExportAudit(auditor, gateway_id)
        self._pseudonyms = pseudonyms
        self.gateway_id = gateway_id
        self._clock = clock

    def _record_step(self, user: UserRef, row: ExportReidentification, action: Action, step: str,
                     patients: list[PatientRef] | None = None) -> None:
        self._audit.auditor.record_now(reidentification_event(
            user=user, gateway_id=self.gateway_id, request_id=row.id, action=action, step=step,
            patients=patients or (),
            details={"Project": row.project, "Kind": row.kind, "Pseudonym": row.pseudonym, "Reason": row.reason,
                     "Requester": row.requester_name, "Approver": row.approver_name,
                     "Comment": row.decision_comment}))

    def request(self, user: UserRef, *, project: str, kind: str, pseudonym: str, reason: str) -> dict[str, object]:
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
        self._record_step(user, row, Action.CREATE, "requested")
        return reidentification_status(row)

    def _load(self, request_id: str) -> ExportReidentification:
        with self._sessions() as session:
            row = session.get(ExportReidentification, request_id)
            if row is None:
                raise ExportNotFound("no such re-identification request")
            return row

    def decide(self, request_id: str, steward: UserRef, *, approve: bool, comment: str) -> dict[str, object]:
        if not comment.strip():
            raise InvalidExportRequest("a comment is required")
        row = self._load(request_id)
        if row.requester_id == steward.user_id:
            self._audit.denied(steward, REID_REQUEST_URN + request_id,
                               f"refused: the requester of re-identification {request_id} cannot be its second "
                               "approver")
            raise SelfApprovalRefused("re-identification needs a second, different data steward")
        new_state = "approved" if approve else "rejected"
        with self._sessions() as session, session.begin():
            done = rows_matched(session.execute(update(ExportReidentification).where(
                ExportReidentification.id == request_id, ExportReidentification.state == "requested",
                ExportReidentification.requester_id != steward.user_id).values(
                state=new_state, approver_id=steward.user_id, approver_name=steward.username or steward.user_id,
                decision_comment=comment, decided_at=self._clock())))
        row = self._load(request_id)
        if not done:
            raise ExportStateConflict(f"the re-identification request is {row.state}, not requested")
        self._record_step(steward, row, Action.UPDATE, new_state)
        return reidentification_status(row)

    def reveal(self, request_id: str, user: UserRef) -> dict[str, object]:
        row = self._load(request_id)
        if row.requester_id != user.user_id:
            raise ExportNotFound("no such re-identification request")
        if row.state != "approved":
            raise ExportStateConflict(f"the re-identification request is {row.state}; it reveals once, when approved")
        # looked up before the request is used up: a pseudonym the map does not hold (or a map that no
        # longer decrypts) leaves the approved request as it was
        original = self._pseudonyms.lookup(row.project, row.kind, row.pseudonym)
        if original is None:
            raise ExportNotFound("no such pseudonym in the project's map")
        with self._sessions() as session, session.begin():
            done = rows_matched(session.execute(update(ExportReidentification).where(
                ExportReidentification.id == request_id, ExportReidentification.state == "approved",
                ExportReidentification.requester_id == user.user_id).values(
                state="revealed", revealed_at=self._clock())))
        if not done:
            raise ExportStateConflict("the re-identification request was revealed already; it reveals once")
        row = self._load(request_id)
        patients = [PatientRef(original)] if row.kind == "patient_id" else []
        self._record_step(user, row, Action.READ, "revealed", patients=patients)
        return {**reidentification_status(row), "original": original}
