"""Operator operations on the archive's keys, each audited (the REST API and the CLI share them).

Who: the API passes the verified token's user (``admin`` role; ``keys:kek:manage`` or
``keys:patient:shred`` in ``policies/rbac.yaml``); the CLI passes the operating-system user
(``os:<name>``, client ``compliance-cli``): it runs on the gateway's host with the archive
credentials from the stack's ``gateway.env`` (mode 0600), so being able to run it at all requires
that account; its events go to the same durable outbox.

Audit (PS3.15 A.5.3):

- ``status``, ``rotate``, ``rewrap``, ``retire``, ``destroy``: 110113 Security Alert with event type
  110129 Security Configuration (CID 403), the operation and its result as the alert description,
  the key store as the alert subject; success or the failure's outcome;
- ``shred``: 110105 DICOM Study Deleted with ParticipantObjectDataLifeCycle 15 (Permanent erasure)
  on the patient and on each of the patient's studies found in the archive's index; when the index
  holds no study for the patient (A.5.3.8 requires one), a 110113 / 110129 alert naming the patient.

The event is recorded after the operation, with its outcome, and before the answer is returned.
"""

from __future__ import annotations

import json
from typing import Any

from compliance.archive.client import ArchiveKeyClient
from compliance.audit.events import (
    DataLifeCycle,
    EventTypeCode,
    Outcome,
    PatientRef,
    StudyRef,
    UserRef,
    security_alert_event,
    study_deleted_event,
)
from compliance.audit.recorder import AuditRecorder
from compliance.errors import ComplianceError, InvalidRequest

__all__ = ["KEY_OPERATIONS", "KeyOperations"]

KEY_OPERATIONS = ("status", "rotate", "rewrap", "retire", "destroy")


def _outcome(exc: BaseException | None) -> Outcome:
    if exc is None:
        return Outcome.SUCCESS
    if isinstance(exc, ComplianceError) and not isinstance(exc, InvalidRequest) and exc.code in (
            "key_state_conflict", "data_key_not_found"):
        return Outcome.MINOR_FAILURE
    return Outcome.SERIOUS_FAILURE


class KeyOperations:
    def __init__(self, client: ArchiveKeyClient, auditor: AuditRecorder, *, gateway_id: str) -> None:
        self.client = client
        self._auditor = auditor
        self._gateway_id = gateway_id

    async def key_operation(self, op: str, user: UserRef, kek_id: str | None = None) -> dict[str, Any]:
        if op not in KEY_OPERATIONS:
            raise InvalidRequest(f"unknown key operation {op!r}")
        if op in ("retire", "destroy") and not kek_id:
            raise InvalidRequest(f"keys {op} needs a KEK id")
        result: dict[str, Any] | None = None
        error: BaseException | None = None
        try:
            if op == "status":
                result = await self.client.status()
            elif op == "rotate":
                result = await self.client.rotate()
            elif op == "rewrap":
                result = await self.client.rewrap()
            elif op == "retire":
                result = await self.client.retire(kek_id or "")
            else:
                result = await self.client.destroy(kek_id or "")
            return result
        except BaseException as exc:
            error = exc
            raise
        finally:
            summary: Any = result if op != "status" else {
                "keks": [(k["id"], k["state"], k["data_keys"]) for k in (result or {}).get("keks", [])]}
            description = f"archive keys {op}" + (f" {kek_id}" if kek_id else "") + ": " + (
                json.dumps(summary, default=str, separators=(",", ":")) if error is None
                else f"failed: {getattr(error, 'message', type(error).__name__)}")
            await self._auditor.record(security_alert_event(
                user=user, gateway_id=self._gateway_id, alert_type=EventTypeCode.SECURITY_CONFIGURATION,
                description=description[:1024], resource=f"archive-keys:{op}", outcome=_outcome(error),
                source_address=user.source_address))

    async def shred_patient(self, patient_id: str, user: UserRef) -> dict[str, Any]:
        if not patient_id:
            raise InvalidRequest("a patient id is required")
        studies = await self.client.patient_studies(patient_id)
        name = next((n for _, n, _ in studies if n), None)
        result: dict[str, Any] | None = None
        error: BaseException | None = None
        try:
            result = await self.client.shred(patient_id)
            result = {"patient_id": patient_id, **result, "studies": [s for s, _, _ in studies]}
            return result
        except BaseException as exc:
            error = exc
            raise
        finally:
            outcome = _outcome(error)
            description = (f"crypto-shredded: {result['destroyed']} data key(s) destroyed, state {result['state']}"
                           if result else f"shred failed: {getattr(error, 'message', type(error).__name__)}")
            patient = PatientRef(patient_id=patient_id, name=name)
            if studies:
                event = study_deleted_event(
                    user=user, gateway_id=self._gateway_id, outcome=outcome, patients=(patient,),
                    studies=tuple(StudyRef(study_uid=s, accession=a) for s, _, a in studies),
                    life_cycle=DataLifeCycle.PERMANENT_ERASURE, outcome_description=description)
            else:
                event = security_alert_event(
                    user=user, gateway_id=self._gateway_id, alert_type=EventTypeCode.SECURITY_CONFIGURATION,
                    description=f"shred of a patient with no study in the archive; {description}",
                    resource="archive-keys:shred", outcome=outcome, patients=(patient,),
                    source_address=user.source_address)
            await self._auditor.record(event)
