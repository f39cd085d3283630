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
  A shred runs only for a request a second administrator approved (:mod:`compliance.archive.shred`
  owns the requests, the two-person rule and the legal holds, and is the only caller of
  :meth:`KeyOperations.execute_shred`); its events name the request and both administrators.

Irreversible operations (``destroy`` and ``shred``) are audited twice: the attempt (110113 / 110129,
naming what is about to be destroyed) is committed to the outbox *before* the archive is asked, so a
crash between the destruction and its outcome event still leaves a record; then the outcome. When
the archive call fails in a way that leaves the result unknown (a timeout, a dropped connection),
the state is read back before the outcome is written, so a completed destruction is never recorded
as failed. Every other operation is recorded after it ran, with its outcome, before the answer.

A shred is complete when the patient's data key is destroyed *and* the patient has left Orthanc's
index, which holds names, ids and dates in plaintext and would otherwise keep answering searches.
The custodian tombstones the studies in the key's transaction (so a retrieve still answers 410),
then the patient is deleted from Orthanc (its files, undecryptable by then, go with it). If that
deletion fails the outcome is a minor failure and the caller gets 502 with the reason; executing the
approved request again finishes it (a shred is idempotent).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from compliance.archive.client import ArchiveKeyClient
from compliance.audit.codes import DataLifeCycle, EventTypeCode, Outcome
from compliance.audit.events import security_alert_event, study_deleted_event
from compliance.audit.message import PatientRef, StudyRef, UserRef
from compliance.audit.recorder import AuditRecorder
from compliance.errors import ComplianceError, InvalidRequest, UpstreamError, UpstreamUnavailable

__all__ = ["KEY_OPERATIONS", "SHRED_REQUEST_URN", "ApprovedShred", "KeyOperations"]

KEY_OPERATIONS = ("status", "rotate", "rewrap", "retire", "destroy")
#: The audit events of a shred request name it as ``urn:compliance:shred-request:<id>``.
SHRED_REQUEST_URN = "urn:compliance:shred-request:"


@dataclass(frozen=True)
class ApprovedShred:
    """The two-person decision behind a shred, as its audit events name it."""

    request_id: str
    requested_by: str
    approved_by: str

    @property
    def resource(self) -> str:
        return SHRED_REQUEST_URN + self.request_id

    @property
    def label(self) -> str:
        return (f"crypto-shred request {self.request_id} (asked by {self.requested_by}, "
                f"approved by {self.approved_by})")


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

    async def _attempt(self, user: UserRef, description: str, resource: str, *,
                       patients: tuple[PatientRef, ...] = (), studies: tuple[StudyRef, ...] = ()) -> None:
        await self._auditor.record(security_alert_event(
            user=user, gateway_id=self._gateway_id, alert_type=EventTypeCode.SECURITY_CONFIGURATION,
            description=description[:1024], resource=resource, outcome=Outcome.SUCCESS,
            source_address=user.source_address, patients=patients, studies=studies))

    async def key_operation(self, op: str, user: UserRef, kek_id: str | None = None) -> dict[str, Any]:
        if op not in KEY_OPERATIONS:
            raise InvalidRequest(f"unknown key operation {op!r}")
        if op in ("retire", "destroy") and not kek_id:
            raise InvalidRequest(f"keys {op} needs a KEK id")
        if op == "destroy":
            await self._attempt(user, f"archive keys destroy {kek_id}: requested; the outcome follows",
                                "archive-keys:destroy")
        result: dict[str, Any] | None = None
        error: BaseException | None = None
        note = ""
        try:
            if op == "status":
                result = await self.client.status()
            elif op == "rotate":
                result = await self.client.rotate()
            elif op == "rewrap":
                result = await self.client.rewrap()
            elif op == "retire":
                result = await self.client.confirm_kek_retired(kek_id or "")
            else:
                try:
                    result = await self.client.destroy(kek_id or "")
                except UpstreamUnavailable as exc:
                    if await self._kek_state(kek_id or "") != "destroyed":
                        raise
                    result = {"kek_id": kek_id, "state": "destroyed"}
                    note = f" (confirmed by reading the state back after: {exc.message})"
            return result
        except BaseException as exc:
            error = exc
            raise
        finally:
            summary: dict[str, Any] | None = result if op != "status" else {
                "keks": [(k["id"], k["state"], k["data_keys"]) for k in (result or {}).get("keks", [])]}
            description = f"archive keys {op}" + (f" {kek_id}" if kek_id else "") + ": " + (
                json.dumps(summary, default=str, separators=(",", ":")) + note if error is None
                else f"failed: {getattr(error, 'message', type(error).__name__)}"
                + (" (the archive did not answer: the outcome is unknown, check `keys status`)"
                   if isinstance(error, UpstreamUnavailable) else ""))
            await self._auditor.record(security_alert_event(
                user=user, gateway_id=self._gateway_id, alert_type=EventTypeCode.SECURITY_CONFIGURATION,
                description=description[:1024], resource=f"archive-keys:{op}", outcome=_outcome(error),
                source_address=user.source_address))

    async def _kek_state(self, kek_id: str) -> str | None:
        try:
            status = await self.client.status()
        except ComplianceError:
            return None
        return next((str(k["state"]) for k in status.get("keks", []) if k.get("id") == kek_id), None)

    async def _patient_state(self, patient_id: str) -> str | None:
        try:
            return await self.client.patient_state(patient_id)
        except ComplianceError:
            return None

    async def execute_shred(self, patient_id: str, user: UserRef, approved: ApprovedShred) -> dict[str, Any]:
        """Destroy the patient's data key and remove the patient from the archive's index.

        Only :class:`compliance.archive.shred.ShredRequests` calls this, for a request a second
        administrator approved; ``user`` is the administrator executing it.
        """
        if not patient_id:
            raise InvalidRequest("a patient id is required")
        try:
            studies = await self.client.patient_studies(patient_id)
        except BaseException as exc:
            # Nothing was destroyed, but an administrator asked to erase a patient: that is on the trail.
            await self._auditor.record(security_alert_event(
                user=user, gateway_id=self._gateway_id, alert_type=EventTypeCode.SECURITY_CONFIGURATION,
                description=f"{approved.label}: not started: the archive could not list the patient's "
                            f"studies: {getattr(exc, 'message', type(exc).__name__)}"[:1024],
                resource=approved.resource, outcome=_outcome(exc), source_address=user.source_address,
                patients=(PatientRef(patient_id=patient_id, name=None),)))
            raise
        name = next((n for _, n, _ in studies if n), None)
        patient = PatientRef(patient_id=patient_id, name=name)
        study_refs = tuple(StudyRef(study_uid=s, accession=a) for s, _, a in studies)
        await self._attempt(
            user, f"{approved.label}: executing: the patient's data key is destroyed and {len(studies)} "
                  "study(ies) removed from the archive; the outcome follows", approved.resource,
            patients=(patient,), studies=study_refs)
        result: dict[str, Any] | None = None
        error: BaseException | None = None
        notes: list[str] = []
        try:
            try:
                shredded = await self.client.shred(patient_id, [s for s, _, _ in studies])
            except UpstreamUnavailable as exc:
                if await self._patient_state(patient_id) != "shredded":
                    raise
                shredded = {"destroyed": None, "state": "shredded"}
                notes.append(f"confirmed by reading the state back after: {exc.message}")
            result = {"patient_id": patient_id, **shredded, "studies": [s for s, _, _ in studies],
                      "index_removed": False}
            if result["state"] == "shredded":
                await self.client.remove_patient_from_index(patient_id)
                result["index_removed"] = True
            return result
        except BaseException as exc:
            error = exc
            if result is not None:  # the key is gone; the index still names the patient
                error = UpstreamError(
                    "the patient's data key was destroyed, but the archive's index still holds the "
                    "patient's identifying attributes; execute the approved request again to remove them",
                    detail={"index_removed": False})
                raise error from exc
            raise
        finally:
            if result is not None:
                description = (f"crypto-shredded: {result['destroyed']} data key(s) destroyed, "
                               f"state {result['state']}, removed from the archive index: "
                               f"{'yes' if result['index_removed'] else 'NO'}")
                outcome = Outcome.SUCCESS if error is None else Outcome.MINOR_FAILURE
            else:
                description = f"shred failed: {getattr(error, 'message', type(error).__name__)}"
                outcome = _outcome(error)
            description = f"{approved.label}: " + "; ".join([description, *notes])
            if studies:
                event = study_deleted_event(
                    user=user, gateway_id=self._gateway_id, outcome=outcome, patients=(patient,),
                    studies=study_refs, life_cycle=DataLifeCycle.PERMANENT_ERASURE,
                    outcome_description=description)
            else:
                event = security_alert_event(
                    user=user, gateway_id=self._gateway_id, alert_type=EventTypeCode.SECURITY_CONFIGURATION,
                    description=f"shred of a patient with no study in the archive; {description}"[:1024],
                    resource=approved.resource, outcome=outcome, patients=(patient,),
                    source_address=user.source_address)
            await self._auditor.record(event)
