"""Push delivery: the released instances of a request STOWed to a DICOMweb research archive.

A request whose destination is a DICOMweb research archive (``destinations.py``) gets no bundle:
each released file (de-identified, through the leak gate) is STOWed to the archive in batches as
the job goes, the outcome of every file is kept in the request's ``delivery`` (checked against the
source identifiers like a bundle's report), and a 110106 Export per batch names the archive as the
recipient. Before a batch leaves, its pseudonym-map entries are recorded, its files are recorded as
``sending`` (``export_delivery_file``) and its 110106 is durable; the destination's answer is recorded
as soon as it comes. So a push that fails or is killed mid-way keeps the list of what was delivered
and the map of what was disclosed, and a re-run (a new attempt after a crash) skips the files already
stored.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from compliance.audit.codes import Outcome
from compliance.audit.events import export_event
from compliance.audit.message import AuditEvent, PatientRef, StudyRef, UserRef
from compliance.exports.delivery_log import DeliveryLog
from compliance.exports.destinations import (
    FAILED,
    STORED,
    UNCONFIRMED,
    DestinationRegistry,
    DicomwebDestination,
)
from compliance.exports.interfaces import DeliveryReport, InstanceReport, InvalidExportRequest, StowClient
from compliance.exports.keys import PseudonymMap
from compliance.exports.models import ExportDeliveryFile, ExportRequest
from compliance.exports.pipeline import (
    Cohort,
    Counters,
    JobError,
    JobSteps,
    Lease,
    Processed,
    Transferred,
    deidentify_instance,
    refuse_identifiers,
    report_json,
)
from compliance.exports.recovery import LeaseLost


class PushDelivery:
    def __init__(self, steps: JobSteps, delivery_log: DeliveryLog, pseudonyms: PseudonymMap,
                 destinations: DestinationRegistry, *,
                 stow_client_factory: Callable[[DicomwebDestination], StowClient],
                 batch_instances: int, batch_max_bytes: int) -> None:
        self._steps = steps
        self._delivery_log = delivery_log
        self._pseudonyms = pseudonyms
        self._destinations = destinations
        self._stow_client_factory = stow_client_factory
        self._batch_instances = max(1, batch_instances)
        self._batch_max_bytes = batch_max_bytes

    def run(self, row: ExportRequest, name: str, counters: Counters, attempt: int, lease: Lease) -> str:
        """De-identify, gate, and STOW released instances in batches; the status reports each file.

        ``ready``: at least one instance was stored (``delivery`` says which were not, and why);
        ``failed``: none was, or the job stopped on an error (``delivery`` then says what was delivered
        before it stopped).

        Each batch, before it leaves: its pseudonym-map entries are recorded (re-identification of
        what the destination holds must not depend on the job ending well), its 110106 Export (the
        destination as recipient, the source patients and studies of the batch) is durable in the
        outbox, and its files are recorded as ``sending`` (fenced: an attempt that lost the request
        sends nothing). The destination's answer is recorded per file as soon as it comes. A job
        killed mid-push therefore never leaves a disclosure unaudited nor a delivered file unlisted.
        A batch the destination refused or never received whole is followed by a second 110106 with
        a failure outcome naming what was not stored: the trail may over-report an attempt, never
        under-report. A re-run skips the files an earlier attempt stored: they are neither sent nor
        disclosed again.
        """
        steps, ledger, delivery_log = self._steps, self._steps.ledger, self._delivery_log
        request_id = row.id
        try:
            dest = self._destinations.get(name)
        except InvalidExportRequest as exc:  # removed from the allow-list since the request was made
            raise JobError(f"the destination {name!r} is no longer configured") from exc
        if not dest.allows(row.project):
            raise JobError(f"project {row.project!r} may no longer export to {name!r}")
        engine = steps.engine(row)
        requester = UserRef(user_id=row.requester_id, username=row.requester_name)
        earlier = delivery_log.delivered_files(request_id)  # what earlier attempts sent (a re-run)
        seen: set[str] = set()
        archive = steps.archive_factory()
        client: StowClient | None = None
        cohort = Cohort()
        files: list[InstanceReport] = []
        tally = {STORED: 0, FAILED: 0, UNCONFIRMED: 0}
        batch: list[Processed] = []
        batches = 0

        def disclosure_event(sent: list[Processed], outcome: Outcome, description: str) -> AuditEvent:
            part = Cohort()
            for instance in sent:
                part.disclosed(instance)
            patients, studies = part.disclosure()
            return export_event(
                user=requester, recipient=dest.name, purpose=row.purpose,
                patients=[PatientRef(patient["id"], patient.get("name")) for patient in patients if patient["id"]],
                studies=[StudyRef(study["uid"], sop_classes=study["sop_classes"]) for study in studies],
                destination_uri=dest.stow_url, anonymized=True, outcome=outcome,
                outcome_description=(f"research export {row.id} (project {row.project}, protocol {row.protocol}, "
                                     f"profile {row.profile}) to {dest.name} ({dest.stow_url}): {description}"))

        def flush() -> None:
            nonlocal batches
            assert client is not None
            lease.check()
            sent = list(batch)
            batch.clear()
            batches += 1
            pseudonyms: set[tuple[str, str, str]] = set()
            for instance in sent:
                pseudonyms |= instance.pseudonyms
            # the map of what is about to be disclosed, then the disclosure itself, durable before a
            # byte leaves (raises, and nothing is sent, if either cannot be recorded)
            self._pseudonyms.record(row.project, pseudonyms)
            steps.auditor.record_now(disclosure_event(sent, Outcome.SUCCESS, f"{len(sent)} instances sent"))
            # the files are on their way (fenced: an attempt that lost the request sends nothing)
            if not delivery_log.record_sending(request_id, attempt, batches,
                                               [(item.sop_instance_uid, item.entry["instance"]) for item in sent]):
                raise LeaseLost("the request was handed to another attempt; the batch was not sent")
            for instance in sent:
                instance.entry.update({"status": "sending", "attempt": attempt})
            failure: Exception | None = None
            try:
                outcomes = client.store([(instance.sop_instance_uid, instance.data or b"") for instance in sent])
            except Exception as exc:  # sent perhaps: the destination may hold it
                failure = exc
                outcomes = dict.fromkeys((instance.sop_instance_uid for instance in sent), (
                    UNCONFIRMED, f"the push stopped while the batch was being sent ({type(exc).__name__})"))
            missing = (UNCONFIRMED, "no outcome for the instance")
            results = {item.sop_instance_uid: outcomes.get(item.sop_instance_uid, missing) for item in sent}
            recorded = delivery_log.record_outcomes(request_id, attempt, results)
            not_stored: list[Processed] = []
            for instance in sent:
                status, reason = results[instance.sop_instance_uid]
                tally[status] += 1
                instance.entry["status"] = status
                if reason:
                    instance.entry["reason"] = reason
                if status != FAILED:  # stored, or may have been: a disclosure either way
                    cohort.disclosed(instance)
                if status != STORED:
                    not_stored.append(instance)
            if not_stored:
                reasons = "; ".join(sorted({str(instance.entry.get("reason")) for instance in not_stored}))[:500]
                steps.auditor.record_now(disclosure_event(
                    not_stored, Outcome.SERIOUS_FAILURE if len(not_stored) == len(sent) else Outcome.MINOR_FAILURE,
                    f"{len(not_stored)} of {len(sent)} instances sent were not confirmed stored ({reasons})"))
            if failure is not None:
                raise failure
            if not recorded:
                raise LeaseLost("the request was handed to another attempt while the batch was sent")

        transferred: Transferred = {}  # what was read from the archive: audited however the job ends
        try:
            plan = steps.plan(row, archive, counters, attempt)
            client = self._stow_client_factory(dest)
            last = time.monotonic()
            for n, (study, series, sop) in enumerate(plan, start=1):
                lease.check()
                instance = deidentify_instance(engine, archive, n, study, series, sop, cohort, transferred)
                counters.count(instance.entry)
                # digests of identifying values stay out of the status (a bundle's report has them); no bundle path
                entry = instance.entry.copy()
                entry.pop("findings", None)
                entry.pop("output", None)
                instance.entry = entry
                files.append(entry)
                if instance.data is not None:
                    entry["sop_instance_uid"] = instance.sop_instance_uid
                    seen.add(instance.sop_instance_uid)
                    prior = earlier.get(instance.sop_instance_uid)
                    if prior is not None and prior.status == STORED:
                        # stored by an earlier attempt (before its worker died): neither sent nor disclosed again
                        entry.update({"status": STORED, "attempt": prior.attempt})
                        tally[STORED] += 1
                        cohort.disclosed(instance)
                    else:
                        batch.append(instance)
                        if len(batch) >= self._batch_instances or \
                                sum(len(b.data or b"") for b in batch) >= self._batch_max_bytes:
                            flush()
                if time.monotonic() - last >= steps.progress_every_seconds:
                    steps.progress(request_id, attempt, counters)
                    last = time.monotonic()
            if batch:
                flush()
            if not counters.released:
                raise JobError("no instance passed de-identification and the leak gate")
        except LeaseLost:
            raise
        except Exception as exc:
            # what was delivered before the job stopped stays on the request, with the map of it
            for entry in files:
                prior = earlier.get(entry.get("sop_instance_uid", ""))
                if entry["status"] == "released" and prior is not None and prior.status in ("sending", UNCONFIRMED):
                    # an earlier attempt sent it without an answer: it may be at the destination
                    entry.update({"status": UNCONFIRMED, "attempt": prior.attempt,
                                  "reason": prior.reason or "sent by an earlier attempt that was interrupted; the "
                                                            "destination's answer is unknown"})
                    tally[UNCONFIRMED] += 1
                elif entry["status"] == "released":
                    entry.update({"status": "not_sent", "reason": "the job stopped before this file was sent"})
                elif entry["status"] == "sending":  # sent, the answer not recorded
                    entry.update({"status": UNCONFIRMED,
                                  "reason": "the job stopped before the destination's answer was recorded"})
                    tally[UNCONFIRMED] += 1
            message = exc.message if hasattr(exc, "message") else type(exc).__name__
            delivery: DeliveryReport | None  # None when the report itself cannot be kept
            delivery = _delivery_report(dest, counters, tally, files, earlier, seen)
            if delivery["stored"] or delivery["unconfirmed"]:
                message = (f"{message} (before the job stopped: {delivery['stored']} instances stored at {dest.name}, "
                           f"{delivery['unconfirmed']} unconfirmed; see delivery.files)")
            try:
                refuse_identifiers("the delivery report", report_json(delivery), cohort.identifiers)
            except JobError:
                delivery = None
            raise JobError(str(message), delivery=delivery) from exc
        finally:
            archive.close()
            if client is not None:
                client.close()
            steps.audit_transfers(requester, row.purpose, transferred)
        delivery = _delivery_report(dest, counters, tally, files, earlier, seen)
        refuse_identifiers("the delivery report", report_json(delivery), cohort.identifiers)
        self._pseudonyms.record(row.project, cohort.pseudonyms)
        patients, studies = cohort.disclosure()
        if not delivery["stored"]:
            if not ledger.fail(
                    request_id, f"no instance was stored at {dest.name}: "
                    + "; ".join(sorted({str(f.get("reason")) for f in delivery["files"] if f.get("reason")}))[:1500],
                    counters.as_dict(), delivery=delivery, attempt=attempt):
                raise LeaseLost("the request was handed to another attempt")
            return "failed"
        if not ledger.finish_delivery(request_id, delivery=delivery, patients=patients, studies=studies,
                                      counters=counters.as_dict(), attempt=attempt):
            raise LeaseLost("the request was handed to another attempt")
        return "ready"


def _delivery_report(dest: DicomwebDestination, counters: Counters, tally: dict[str, int],
                     files: list[InstanceReport], earlier: dict[str, ExportDeliveryFile],
                     seen: set[str]) -> DeliveryReport:
    """The delivery report; files an earlier attempt sent that this one did not reach are listed too."""
    tally = dict(tally)
    files = list(files)
    for uid, f in sorted(earlier.items(), key=lambda item: (item[1].instance, item[0])):
        if uid in seen:
            continue
        status = UNCONFIRMED if f.status == "sending" else f.status
        entry = InstanceReport(instance=f.instance, sop_instance_uid=uid, status=status, attempt=f.attempt)
        reason = f.reason or ("the job was interrupted while this file was being sent"
                              if f.status == "sending" else None)
        if reason:
            entry["reason"] = reason
        tally[status] += 1
        files.append(entry)
    return DeliveryReport(destination=dest.public(), stow_url=dest.stow_url, instances=counters.total,
                          released=counters.released + sum(1 for uid in earlier if uid not in seen),
                          stored=tally[STORED], failed=tally[FAILED], unconfirmed=tally[UNCONFIRMED], files=files)
