"""What both deliveries of an export job share: the plan, one instance through de-identification and
the leak gate, the counters, the cohort's disclosure, and the second gate over the job's own files.

The archive is read with the gateway's credentials (``ArchiveReader``); every instance read is
counted for the 110104 DICOM Instances Transferred of its study (:meth:`JobSteps.audit_transfers`),
however the job ends. An instance is de-identified in memory and released only through the engine's
leak gate; one without a PatientID is held back (a disclosure must name whose data left).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pydicom

from compliance.audit.codes import Outcome
from compliance.audit.events import instances_transferred_event
from compliance.audit.message import PatientRef, StudyRef, UserRef
from compliance.audit.recorder import AuditRecorder
from compliance.deid.engine import Deidentifier
from compliance.deid.profiles import load_profile
from compliance.deid.writer import encode
from compliance.errors import UpstreamError, UpstreamUnavailable
from compliance.exports.interfaces import (
    ArchiveReader,
    DeliveryReport,
    DisclosedPatient,
    DisclosedStudy,
    InstanceReport,
    LeakFinding,
)
from compliance.exports.keys import ProjectKeyStore, ProviderPseudonymSecretSource
from compliance.exports.ledger import JobLedger
from compliance.exports.models import ExportRequest
from compliance.exports.recovery import LeaseKeeper, LeaseLost, NoLease

Lease = LeaseKeeper | NoLease
#: study UID -> (patient ID, patient name, {SOP class UID: instances}) read from the archive
Transferred = dict[str, tuple[str | None, str | None, dict[str, int]]]

_SOURCE_ATTRS = (("patient_id", "PatientID"), ("accession", "AccessionNumber"), ("study_uid", "StudyInstanceUID"),
                 ("series_uid", "SeriesInstanceUID"), ("sop_uid", "SOPInstanceUID"))


@dataclass
class Counters:
    total: int = 0
    processed: int = 0
    released: int = 0
    held_back: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    def count(self, entry: InstanceReport) -> None:
        """One more instance processed, counted by the status of its report entry."""
        self.processed += 1
        name = entry["status"] if entry["status"] != "error" else "errors"
        setattr(self, name, getattr(self, name) + 1)


@dataclass
class Processed:
    """One instance of the plan after de-identification: its report entry, and the file if released."""

    entry: InstanceReport
    study: str
    patient_id: str | None = None
    patient_name: str | None = None
    sop_class: str = ""
    data: bytes | None = None
    path: str = ""
    sop_instance_uid: str = ""
    #: (kind, original, pseudonym) of this instance, for the pseudonym map
    pseudonyms: set[tuple[str, str, str]] = field(default_factory=set)


@dataclass
class Cohort:
    patients: dict[str, str | None] = field(default_factory=dict)
    studies: dict[str, dict[str, int]] = field(default_factory=dict)
    identifiers: set[str] = field(default_factory=set)
    pseudonyms: set[tuple[str, str, str]] = field(default_factory=set)

    def disclosed(self, instance: Processed) -> None:
        """Count an instance that left (in the bundle, or stored at a destination) for the disclosure."""
        if instance.patient_id:
            self.patients.setdefault(instance.patient_id, instance.patient_name)
        classes = self.studies.setdefault(instance.study, {})
        classes[instance.sop_class] = classes.get(instance.sop_class, 0) + 1

    def disclosure(self) -> tuple[list[DisclosedPatient], list[DisclosedStudy]]:
        return ([DisclosedPatient(id=pid, name=name) for pid, name in sorted(self.patients.items())],
                [DisclosedStudy(uid=uid, sop_classes=classes) for uid, classes in sorted(self.studies.items())])


class JobError(Exception):
    def __init__(self, message: str, *, delivery: DeliveryReport | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: a push's delivery report as far as it went (kept on the failed request)
        self.delivery = delivery


def report_json(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def refuse_identifiers(name: str, data: bytes, identifiers: set[str]) -> None:
    """A second gate over the files the job writes itself (the leak gate covered every DICOM file).

    Bounded like the leak gate's expression, so an identifier never matches inside a longer token
    (a digest, a pseudonym UID). Short all-digit identifiers are skipped: these files carry numbers
    of their own (counts, sizes, instance numbers) and no source value is ever copied into them.
    """
    text = data.decode("utf-8").upper()
    idents = [i.upper() for i in identifiers if not (i.isdigit() and len(i) < 8)]
    if not idents:
        return
    pattern = re.compile(r"(?<![A-Z0-9_.])(?:" + "|".join(re.escape(i) for i in sorted(idents, key=len, reverse=True))
                         + r")(?![A-Z0-9_])")
    if pattern.search(text):
        raise JobError(f"{name} would contain a source identifier; the bundle was not released")


def deidentify_instance(engine: Deidentifier, archive: ArchiveReader, n: int, study: str, series: str, sop: str,
                        cohort: Cohort, transferred: Transferred) -> Processed:
    """Instance ``n`` of the plan, read from the archive and de-identified in memory: released (with
    its file and pseudonyms), held back, or an error, as its report entry says."""
    instance = Processed(entry={"instance": n}, study=study)
    cohort.identifiers.update((study, series, sop))
    try:
        ds = pydicom.dcmread(io.BytesIO(archive.retrieve_instance(study, series, sop)))
    except (UpstreamError, UpstreamUnavailable):
        raise
    except Exception as exc:
        instance.entry.update({"status": "error", "reasons": [f"unreadable: {type(exc).__name__}"]})
        return instance
    source = {kind: str(ds.get(attr, "") or "").strip() for kind, attr in _SOURCE_ATTRS}
    patient_name = str(ds.get("PatientName", "") or "") or None
    sop_class = str(ds.get("SOPClassUID", "") or "")
    instance.patient_id, instance.patient_name = source["patient_id"] or None, patient_name
    instance.sop_class = sop_class
    cohort.identifiers.update(v for v in (*source.values(), patient_name) if v and len(v) >= 3)
    pid_name_classes = transferred.setdefault(study, (source["patient_id"] or None, patient_name, {}))
    pid_name_classes[2][sop_class] = pid_name_classes[2].get(sop_class, 0) + 1
    if not source["patient_id"]:
        # a disclosure must name whose data left (the 110106 Export needs the patient): held back
        instance.entry.update({"status": "held_back",
                               "reasons": ["no PatientID: the disclosure could not name the patient"]})
        return instance
    try:
        result = engine.deidentify(ds)
    except Exception as exc:
        instance.entry.update({"status": "error", "reasons": [f"could not de-identify: {type(exc).__name__}"]})
        return instance
    if not result.released or result.dataset is None:
        # where and what kind, never a digest of the value: an unsalted hash of a patient ID or a
        # birth date is reversed by brute force, and this report goes to the researcher
        instance.entry.update({"status": "held_back", "reasons": result.reasons, "pixels": result.pixels,
                        "findings": [LeakFinding(path=f.path, kind=f.kind) for f in result.findings]})
        return instance
    out = result.dataset
    data = encode(out)
    target = {kind: str(out.get(attr, "") or "").strip() for kind, attr in _SOURCE_ATTRS}
    for kind, original in source.items():
        if original and target[kind] and target[kind] != original:
            instance.pseudonyms.add((kind, original, target[kind]))
    cohort.pseudonyms |= instance.pseudonyms
    instance.path = f"dicom/{target['study_uid']}/{target['series_uid']}/{target['sop_uid']}.dcm"
    instance.data, instance.sop_instance_uid = data, target["sop_uid"]
    instance.entry.update({"status": "released", "output": instance.path, "pixels": result.pixels,
                           "notes": result.reasons})
    return instance


class JobSteps:
    """The steps of a job that talk to the request and the audit trail, the same for both deliveries."""

    def __init__(self, ledger: JobLedger, keys: ProjectKeyStore, auditor: AuditRecorder,
                 archive_factory: Callable[[], ArchiveReader], *, gateway_id: str, archive_id: str,
                 progress_every_seconds: float) -> None:
        self.ledger = ledger
        self.keys = keys
        self.auditor = auditor
        self.gateway_id = gateway_id
        self.archive_factory = archive_factory
        self.archive_id = archive_id
        self.progress_every_seconds = progress_every_seconds

    def plan(self, row: ExportRequest, archive: ArchiveReader, counters: Counters,
             attempt: int) -> list[tuple[str, str, str]]:
        """(study, series, SOP instance) UIDs of every instance of the request's cohort."""
        cohort_spec = json.loads(row.cohort)
        studies = cohort_spec.get("study_uids") or archive.find_studies(cohort_spec.get("filters") or {})
        plan = [(s, series, sop) for s in studies for series, sop in archive.find_instances(s)]
        if not plan:
            raise JobError("the cohort matched no instance in the archive")
        counters.total = len(plan)
        self.progress(row.id, attempt, counters)
        return plan

    def progress(self, request_id: str, attempt: int, counters: Counters) -> None:
        if not self.ledger.progress(request_id, attempt=attempt, **counters.as_dict()):
            raise LeaseLost("the request is no longer this attempt's")

    def engine(self, row: ExportRequest) -> Deidentifier:
        return Deidentifier(load_profile(row.profile), row.project, ProviderPseudonymSecretSource(self.keys))

    def audit_transfers(self, requester: UserRef, purpose: str, transferred: Transferred) -> None:
        for study, (pid, name, classes) in transferred.items():
            self.auditor.record_now(instances_transferred_event(
                user=requester, gateway_id=self.gateway_id, source_id=self.archive_id,
                destination_id=f"{self.gateway_id}/export-job", outcome=Outcome.SUCCESS,
                patients=[PatientRef(pid, name)] if pid else [], studies=[StudyRef(study, sop_classes=classes)],
                purpose_of_use=[purpose],
                outcome_description="read from the archive for an approved research export (de-identified in memory)"))
