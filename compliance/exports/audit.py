"""Audit events of the export workflow (built on :mod:`compliance.audit.events`).

Which PS3.15 A.5.3 message each step is, and why:

- request created, approved, rejected; job started, ready, failed; bundle expired:
  **110109 Order Record** (action C for the creation, U for every state change). An export request
  is an order for a disclosure; PS3.15 has no workflow event, and Order Record is the message for
  "an order was created or modified" without being a disclosure itself. The request is the
  participant object (system object, role 20 Job, id ``urn:compliance:export-request:<id>``) with
  its project, protocol, purpose, profile and new state as details.
- the job reads the cohort from the archive: **110104 DICOM Instances Transferred** (the builder in
  ``compliance.audit.events``), one per study: identified instances leave the archive for the job.
- the requester downloads the bundle: **110106 Export** (the builder). THE disclosure: recipient,
  destination, purpose of use, and the SOURCE patient IDs and study UIDs, not the pseudonyms:
  HIPAA 164.528 accounting of disclosures must let the hospital tell a patient that their data was
  disclosed, which pseudonyms cannot do. The studies are flagged Anonymized.
- a self-approval attempt: **110113 Security Alert** (110147 Access Control Decision), as every denial.
- re-identification requested, approved, rejected: **110110 Patient Record**, action C / U; the
  object is the request (its project, kind and pseudonym as details).
- re-identification revealed: **110110 Patient Record**, action R, with the patient (the revealed
  original): the identity was read, and the event names whom it was read about.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

from compliance.audit.codes import Action, EventID, EventTypeCode, ObjectIDTypeCode, ObjectRole, ObjectType, Outcome
from compliance.audit.events import patient_object, security_alert_event, study_object, workflow_participants
from compliance.audit.message import AuditEvent, ParticipantObject, PatientRef, StudyRef, UserRef
from compliance.audit.recorder import AuditRecorder
from compliance.exports.destinations import BUNDLE, DICOMWEB
from compliance.exports.models import ExportRequest

EXPORT_REQUEST_URN = "urn:compliance:export-request:"
REID_REQUEST_URN = "urn:compliance:reidentification:"
#: The resource of a refused project in a 110113 (the name the caller gave, registered or not).
PROJECT_URN = "urn:compliance:research-project:"


def _details(details: dict[str, str | None]) -> tuple[tuple[str, bytes], ...]:
    return tuple((k, v.encode("utf-8")) for k, v in details.items() if v)


def export_request_event(*, user: UserRef | None, gateway_id: str, request_id: str, action: Action, step: str,
                         details: dict[str, str | None], outcome: Outcome = Outcome.SUCCESS,
                         description: str | None = None, studies: Sequence[StudyRef] = ()) -> AuditEvent:
    obj = ParticipantObject(
        id=EXPORT_REQUEST_URN + request_id,
        type_code=ObjectType.SYSTEM_OBJECT,
        type_code_role=ObjectRole.JOB,
        id_type_code=ObjectIDTypeCode.URI,
        name=f"export request {request_id}",
        details=_details({"Step": step, **details}),
    )
    return AuditEvent(event_id=EventID.ORDER_RECORD, action=action, outcome=outcome,
                      occurred_at=_now(), participants=workflow_participants(user, gateway_id),
                      objects=(obj, *(study_object(s) for s in studies)),
                      outcome_description=description or f"export request {step}")


def reidentification_event(*, user: UserRef, gateway_id: str, request_id: str, action: Action, step: str,
                           details: dict[str, str | None], outcome: Outcome = Outcome.SUCCESS,
                           patients: Sequence[PatientRef] = (), description: str | None = None) -> AuditEvent:
    obj = ParticipantObject(
        id=REID_REQUEST_URN + request_id,
        type_code=ObjectType.SYSTEM_OBJECT,
        type_code_role=ObjectRole.JOB,
        id_type_code=ObjectIDTypeCode.URI,
        name=f"re-identification {request_id}",
        details=_details({"Step": step, **details}),
    )
    return AuditEvent(event_id=EventID.PATIENT_RECORD, action=action, outcome=outcome, occurred_at=_now(),
                      participants=workflow_participants(user, gateway_id),
                      objects=(obj, *(patient_object(p) for p in patients)),
                      outcome_description=description or f"re-identification {step}")


def destination_label(row: ExportRequest) -> str:
    """``bundle``, or ``dicomweb:<name>``: the destination of a request as its audit events name it."""
    dest = json.loads(row.destination)
    return f"{DICOMWEB}:{dest.get('name')}" if dest.get("kind") == DICOMWEB else BUNDLE


class ExportAudit:
    """Records the export domain's own events: the steps of export requests (110109 Order Record) and its
    denials (110113 Security Alert, Access Control Decision)."""

    def __init__(self, auditor: AuditRecorder, gateway_id: str) -> None:
        self.auditor = auditor
        self.gateway_id = gateway_id

    def step(self, user: UserRef | None, row: ExportRequest, action: Action, step: str,
             outcome: Outcome = Outcome.SUCCESS, description: str | None = None) -> None:
        """The 110109 of a step of ``row`` (``user`` None: the gateway's own step, e.g. a job's)."""
        self.auditor.record_now(export_request_event(
            user=user, gateway_id=self.gateway_id, request_id=row.id, action=action, step=step, outcome=outcome,
            description=description,
            details={"Project": row.project, "Protocol": row.protocol, "Purpose": row.purpose, "Profile": row.profile,
                     "Destination": destination_label(row), "State": row.state, "Requester": row.requester_name,
                     "Membership": row.requester_membership, "Comment": row.decision_comment}))

    def denied(self, user: UserRef, resource: str, description: str) -> None:
        """A refused access decision about ``resource`` (a URN): 110113, as every denial of the domain."""
        self.auditor.record_now(security_alert_event(
            user=user, gateway_id=self.gateway_id, alert_type=EventTypeCode.ACCESS_CONTROL_DECISION,
            description=description, resource=resource, outcome=Outcome.MINOR_FAILURE))

    def refused(self, user: UserRef, project: str, description: str) -> None:
        """A refused access decision about a project (the name the caller gave, registered or not)."""
        self.denied(user, PROJECT_URN + project, description)


def _now() -> datetime:
    return datetime.now(UTC)
