"""Which audit event a DICOMweb request records, and with what outcome (PS3.15 A.5.3).

QIDO -> 110112 Query; WADO of whole instances -> 110104 Instances Transferred (archive to the
requesting application); WADO of metadata, frames, bulk data, rendered or thumbnails -> 110103
Instances Accessed (Read); STOW -> 110107 Import; denial -> 110113 (recorded by
``compliance.policy.enforce``); a stored file that does not authenticate, or an instance the archive
stored that the gateway never validated -> 110113 Security Alert.
"""

from __future__ import annotations

from collections.abc import Sequence

from compliance.audit.codes import Action, EventTypeCode, Outcome
from compliance.audit.events import (
    import_event,
    instances_accessed_event,
    instances_transferred_event,
    query_event,
    security_alert_event,
)
from compliance.audit.message import AuditEvent, PatientRef, StudyRef
from compliance.dicomweb.interfaces import RequestContext, StudySummary
from compliance.dicomweb.routing import Route, Transaction
from compliance.dicomweb.stow import StowInstance


def outcome_of(status: int) -> Outcome:
    if status == 202:  # PS3.18: accepted with warnings or failures (a STOW that stored only some)
        return Outcome.MINOR_FAILURE
    if status < 300:
        return Outcome.SUCCESS
    if status < 500:
        return Outcome.MINOR_FAILURE
    return Outcome.SERIOUS_FAILURE


def study_patient(summary: StudySummary | None) -> tuple[PatientRef, ...]:
    """The patient of a study, as the archive's index names it (none when it does not)."""
    if summary is None or not summary.patient_id:
        return ()
    return (PatientRef(patient_id=summary.patient_id, name=summary.patient_name),)


def patients_of(instances: Sequence[StowInstance]) -> tuple[PatientRef, ...]:
    seen: dict[tuple[str | None, str | None], PatientRef] = {}
    for i in instances:
        if i.patient_id:
            seen.setdefault((i.patient_id, i.patient_name), PatientRef(patient_id=i.patient_id, name=i.patient_name))
    return tuple(seen.values())


def studies_of(instances: Sequence[StowInstance]) -> tuple[StudyRef, ...]:
    counts: dict[str, dict[str, int]] = {}
    accession: dict[str, str | None] = {}
    for i in instances:
        per = counts.setdefault(i.study_uid, {})
        per[i.sop_class_uid] = per.get(i.sop_class_uid, 0) + 1
        accession.setdefault(i.study_uid, i.accession)
    return tuple(StudyRef(study_uid=s, sop_classes=c, accession=accession[s]) for s, c in counts.items())


class DicomwebEvents:
    """The audit events of DICOMweb requests, built for one gateway in front of one archive."""

    def __init__(self, *, gateway_id: str, archive_id: str) -> None:
        self._gateway_id = gateway_id
        self._archive_id = archive_id

    def search(self, ctx: RequestContext, status: int, description: str | None,
               patients: tuple[PatientRef, ...], studies: tuple[StudyRef, ...]) -> AuditEvent:
        """The 110112 Query event of a search, with the outcome of the status it is answered with."""
        return query_event(user=ctx.user, gateway_id=self._gateway_id, outcome=outcome_of(status),
                           outcome_description=description, query=f"{ctx.method} {ctx.target}".encode(),
                           sop_class_uid=None, patients=patients, studies=studies)

    def retrieve(self, ctx: RequestContext, route: Route, status: int, summary: StudySummary | None) -> AuditEvent:
        """The 110104 (whole instances) or 110103 (anything else) event of a retrieve."""
        patients = study_patient(summary)
        studies = (
            StudyRef(study_uid=route.study_uid or "", accession=summary.accession if summary else None),
        )
        description = None if status < 300 else f"archive status {status}"
        if ctx.released_event and description:
            description += f"; the transfer released by event {ctx.released_event} was not delivered"
        if route.transaction is Transaction.RETRIEVE:
            return instances_transferred_event(
                user=ctx.user, gateway_id=self._gateway_id, source_id=self._archive_id, outcome=outcome_of(status),
                outcome_description=description, patients=patients, studies=studies)
        return instances_accessed_event(
            user=ctx.user, gateway_id=self._gateway_id, action=Action.READ, outcome=outcome_of(status),
            outcome_description=description, patients=patients, studies=studies)

    def store(self, ctx: RequestContext, outcome: Outcome, description: str | None,
              instances: Sequence[StowInstance]) -> AuditEvent:
        """The 110107 Import event of a STOW, naming the patients and studies of ``instances``."""
        return import_event(user=ctx.user, gateway_id=self._gateway_id, outcome=outcome,
                            outcome_description=description, patients=patients_of(instances),
                            studies=studies_of(instances))

    def integrity_alert(self, ctx: RequestContext, description: str, patients: tuple[PatientRef, ...] = (),
                        studies: tuple[StudyRef, ...] = ()) -> AuditEvent:
        """The 110113 alert of a stored file that did not authenticate."""
        return security_alert_event(
            user=ctx.user, gateway_id=self._gateway_id, alert_type=EventTypeCode.OBJECT_SECURITY_ATTRIBUTES_CHANGED,
            description=description, resource=f"dicomweb:{ctx.target}", outcome=Outcome.SERIOUS_FAILURE,
            source_address=ctx.source_address, patients=patients, studies=studies)

    def unvalidated_alert(self, ctx: RequestContext, description: str, outcome: Outcome) -> AuditEvent:
        """The 110113 alert of instances the archive reported that the gateway did not validate."""
        return security_alert_event(
            user=ctx.user, gateway_id=self._gateway_id, alert_type=EventTypeCode.USE_OF_RESTRICTED_FUNCTION,
            description=description, resource=f"dicomweb:{ctx.target}", outcome=outcome,
            source_address=ctx.source_address)
