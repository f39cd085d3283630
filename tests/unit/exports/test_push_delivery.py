"""Push delivery (``compliance.exports.push_delivery``) to a recording research archive: per-file
outcomes, the 110106 of each batch durable before it leaves, and a push that stops mid-way (a
``BaseException`` raised inside the job stands for the worker being killed: nothing of the job's own
error handling runs, as with kill -9) keeps its delivery and map, and a re-run sends only the rest.

``DicomwebStowClient`` reading real STOW-RS answers is tested in test_destinations; the push into a
real second Orthanc in tests/integration/test_exports.py."""

from __future__ import annotations

import io
import json
from datetime import timedelta

import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select

from compliance.errors import UpstreamUnavailable
from compliance.exports.destinations import STORED, DestinationRegistry
from compliance.exports.interfaces import ExportStateConflict
from compliance.exports.models import ExportDeliveryFile, ExportPseudonym
from compliance.exports.recovery import RecoveryPolicy
from compliance.exports.workers import Sweeper, run_claimed

from .builders import FILES, ROB, SOURCES, source_patient, status_of


def test_push_stores_every_released_instance_and_audits_the_destination(pushworld):  # type: ignore[no-untyped-def]
    rid = pushworld.approved()
    assert pushworld.service.get(rid, reader_id=ROB.user_id, may_read_all=False)["destination"] == \
        {"kind": "dicomweb", "name": "research-pacs"}
    assert run_claimed(pushworld.comps, rid) == "ready"
    status = pushworld.service.get(rid, reader_id=ROB.user_id, may_read_all=False)
    assert status["state"] == "ready" and status["error"] is None and status["bundle_size"] is None
    delivery = status["delivery"]
    assert (delivery["stored"], delivery["failed"], delivery["unconfirmed"], delivery["released"]) == (2, 0, 0, 2)
    assert delivery["destination"]["name"] == "research-pacs"
    assert delivery["stow_url"] == "http://research.example/dicom-web/studies"
    assert [f["status"] for f in delivery["files"]] == ["stored", "stored"]
    # What reached the destination is de-identified: no source patient ID, name or UID in any byte.
    pushed = [data for batch in pushworld.stow.batches for _, data in batch]
    assert len(pushworld.stow.batches) == 2 and pushworld.stow.closed  # batches of one, as configured
    for f in FILES:
        src = pydicom.dcmread(get_testdata_file(f))
        for data in pushed:
            for value in (str(src.PatientID), str(src.PatientName), src.StudyInstanceUID, src.SOPInstanceUID):
                assert value.encode() not in data
    for data, entry in zip(pushed, delivery["files"], strict=True):
        out = pydicom.dcmread(io.BytesIO(data))
        assert out.PatientIdentityRemoved == "YES" and out.SOPInstanceUID == entry["sop_instance_uid"]
        assert out.SOPInstanceUID.startswith("2.25.")
    # Nothing to download: the data went to the archive.
    with pytest.raises(ExportStateConflict, match="no bundle"):
        pushworld.service.open_bundle(rid, ROB, destination_uri="x")
    assert not list((pushworld.tmp / "bundles").glob("*.bundle"))
    # THE disclosure: one 110106 per batch to the destination, with the SOURCE patients of the batch.
    exports = pushworld.events("110106")
    assert len(exports) == 2
    for doc in exports:
        assert doc["recipient"] == "research-pacs" and doc["user.name"] == "rob" and doc["event.outcome"] == 0
        assert "http://research.example/dicom-web/studies" in doc["participant.ids"]
        assert "1 instances sent" in doc["event.outcome_description"]
    assert {pid for doc in exports for pid in doc["patient.ids"]} == set(SOURCES)
    steps = [d for d in pushworld.events("110109") if "delivered" in (d["event.outcome_description"] or "")]
    assert [d["event.outcome_description"] for d in steps] == \
        ["export delivered to research-pacs: 2 stored, 0 failed, 0 unconfirmed"]


def test_partial_failure_is_reported_per_file(pushworld):  # type: ignore[no-untyped-def]
    mr_patient = next(pid for pid, f in SOURCES.items() if f.startswith("MR"))
    ct_patient = next(pid for pid, f in SOURCES.items() if f.startswith("CT"))
    pushworld.stow.fail_patients = {mr_patient}
    rid = pushworld.approved()
    assert run_claimed(pushworld.comps, rid) == "ready"
    status = pushworld.service.get(rid, reader_id=ROB.user_id, may_read_all=False)
    delivery = status["delivery"]
    assert (delivery["stored"], delivery["failed"]) == (1, 1)
    by_status = {f["status"]: f for f in delivery["files"]}
    assert by_status["failed"]["reason"] == "destination refused the instance: out of resources"
    assert "reason" not in by_status["stored"]
    assert status["error"].startswith("partial delivery: 1 of 2")
    # each batch was audited as it left; the refused one is followed by its failure
    docs = pushworld.events("110106")
    assert [(d["patient.ids"], d["event.outcome"]) for d in docs] == \
        [([ct_patient], 0), ([mr_patient], 0), ([mr_patient], 8)]
    assert "1 of 1 instances sent were not confirmed stored" in docs[2]["event.outcome_description"]


def test_unconfirmed_counts_as_disclosed(pushworld):  # type: ignore[no-untyped-def]
    pushworld.stow.unconfirmed_patients = set(SOURCES)
    rid = pushworld.approved()
    assert run_claimed(pushworld.comps, rid) == "failed"  # nothing confirmed stored
    status = pushworld.service.get(rid, reader_id=ROB.user_id, may_read_all=False)
    assert status["delivery"]["unconfirmed"] == 2 and "ReadTimeout" in status["error"]
    # it may have arrived: the audit never under-reports (sent, then not confirmed)
    docs = pushworld.events("110106")
    assert [d["event.outcome"] for d in docs] == [0, 8, 0, 8]
    assert {pid for d in docs for pid in d["patient.ids"]} == set(SOURCES)


def test_nothing_stored_fails_and_each_attempt_is_audited_with_its_failure(pushworld):  # type: ignore[no-untyped-def]
    pushworld.stow.fail_patients = set(SOURCES)
    rid = pushworld.approved()
    assert run_claimed(pushworld.comps, rid) == "failed"
    status = pushworld.service.get(rid, reader_id=ROB.user_id, may_read_all=False)
    assert status["state"] == "failed" and "no instance was stored at research-pacs" in status["error"]
    assert [f["status"] for f in status["delivery"]["files"]] == ["failed", "failed"]
    assert [d["event.outcome"] for d in pushworld.events("110106")] == [0, 8, 0, 8]


def test_the_disclosure_is_durable_before_the_batch_leaves(pushworld):  # type: ignore[no-untyped-def]
    """A job killed mid-push must not leave a disclosure unaudited: the event precedes the STOW."""
    seen: list[int] = []
    store = pushworld.stow.store

    def store_after_checking(items):  # type: ignore[no-untyped-def]
        seen.append(len(pushworld.events("110106")))
        return store(items)

    pushworld.stow.store = store_after_checking
    rid = pushworld.approved()
    assert run_claimed(pushworld.comps, rid) == "ready"
    assert seen == [1, 2]  # batch n's event was in the outbox when batch n was sent


def test_a_destination_removed_from_the_list_is_not_used(pushworld):  # type: ignore[no-untyped-def]
    rid = pushworld.approved()
    pushworld.comps.job._push._destinations = DestinationRegistry()  # the list changed after approval
    assert run_claimed(pushworld.comps, rid) == "failed"
    assert "no longer configured" in pushworld.service.get(rid, reader_id="x", may_read_all=True)["error"]
    assert pushworld.stow.batches == []


class Killed(BaseException):
    """The worker process dies (kill -9): no handler of the job runs."""


def source_sop_instance_uid(data: bytes) -> str:
    """The SOP Instance UID of the source file a pseudonymised instance was made from."""
    return str(pydicom.dcmread(get_testdata_file(SOURCES[source_patient(data)])).SOPInstanceUID)


def _killed_sending_the_second_batch(pushworld, *, sent: bool) -> str:  # type: ignore[no-untyped-def]
    """Approve a push and run it until its worker is killed while the second batch is being sent
    (``sent``: after the batch reached the destination); the request's id."""
    store = pushworld.stow.store

    def dies_on_the_second_batch(items):  # type: ignore[no-untyped-def]
        if len(pushworld.stow.batches) == 1:
            if sent:
                pushworld.stow.batches.append(list(items))
            raise Killed()
        return store(items)

    pushworld.stow.store = dies_on_the_second_batch
    rid = pushworld.approved()
    with pytest.raises(Killed):
        run_claimed(pushworld.comps, rid)
    return str(rid)


def _map_rows(world) -> set[tuple[str, str]]:  # type: ignore[no-untyped-def]
    with world.sessions() as s:
        return {(r.kind, r.pseudonym) for r in s.scalars(select(ExportPseudonym))}


def test_a_push_killed_mid_way_keeps_what_was_delivered_and_a_rerun_sends_only_the_rest(pushworld):  # type: ignore[no-untyped-def]
    store = pushworld.stow.store
    rid = _killed_sending_the_second_batch(pushworld, sent=True)
    first, second = (batch[0] for batch in pushworld.stow.batches)

    # What the request shows after the crash: the first file stored, the second on its way.
    status = status_of(pushworld, rid)
    assert status["state"] == "running"
    delivery = status["delivery"]
    assert (delivery["stored"], delivery["sending"], delivery["recorded"]) == (1, 1, "per batch")
    assert [(f["sop_instance_uid"], f["status"]) for f in delivery["files"]] == [(first[0], "stored"),
                                                                                 (second[0], "sending")]
    # The map of what was disclosed is kept: the pseudonymised UIDs of both batches reverse to their source.
    assert {("sop_uid", first[0]), ("sop_uid", second[0])} <= _map_rows(pushworld)
    for uid, data in ((first[0], first[1]), (second[0], second[1])):
        source = pydicom.dcmread(io.BytesIO(data))
        assert pushworld.pmap.lookup("lung-study", "patient_id", str(source.PatientID)) == source_patient(data)
        assert pushworld.pmap.lookup("lung-study", "sop_uid", uid) == source_sop_instance_uid(data)
    attempts_audited = pushworld.events("110106")
    assert [(d["patient.ids"], d["event.outcome"]) for d in attempts_audited] == \
        [([source_patient(first[1])], 0), ([source_patient(second[1])], 0)]

    # The lease runs out; the sweep requeues; the re-run sends only what was not stored.
    pushworld.stow.store = store
    pushworld.clock.now += timedelta(seconds=121)
    assert Sweeper(pushworld.comps).sweep()["requeued"] == 1
    assert run_claimed(pushworld.comps, rid) == "ready"
    assert [b[0][0] for b in pushworld.stow.batches] == [first[0], second[0], second[0]]
    status = status_of(pushworld, rid)
    assert status["attempts"] == 2 and status["error"] is None
    delivery = status["delivery"]
    assert (delivery["stored"], delivery["failed"], delivery["unconfirmed"]) == (2, 0, 0)
    assert [(f["sop_instance_uid"], f["status"], f["attempt"]) for f in delivery["files"]] == \
        [(first[0], STORED, 1), (second[0], STORED, 2)]
    # The file stored before the crash was not disclosed again; the one in flight was sent again, and says so.
    docs = pushworld.events("110106")
    assert [(d["patient.ids"], d["event.outcome"]) for d in docs] == \
        [([source_patient(first[1])], 0), ([source_patient(second[1])], 0), ([source_patient(second[1])], 0)]
    with pushworld.sessions() as s:
        rows = {r.sop_instance_uid: (r.status, r.attempt) for r in s.scalars(select(ExportDeliveryFile))}
    assert rows == {first[0]: ("stored", 1), second[0]: ("stored", 2)}


def test_a_push_failing_mid_way_keeps_the_delivery_and_the_map(pushworld):  # type: ignore[no-untyped-def]
    """The archive goes away after the first batch was stored: the request fails, and says what was delivered."""
    retrieve, calls = pushworld.archive.retrieve_instance, []

    def failing_second(*uids):  # type: ignore[no-untyped-def]
        calls.append(uids)
        if len(calls) == 2:
            raise UpstreamUnavailable("the archive cannot be reached")
        return retrieve(*uids)

    pushworld.archive.retrieve_instance = failing_second
    rid = pushworld.approved()
    assert run_claimed(pushworld.comps, rid) == "failed"
    ((uid, data),) = pushworld.stow.batches[0]
    status = status_of(pushworld, rid)
    assert status["state"] == "failed"
    assert status["error"].startswith("the archive cannot be reached (before the job stopped: 1 instances stored "
                                      "at research-pacs")
    delivery = status["delivery"]
    assert (delivery["stored"], delivery["failed"], delivery["unconfirmed"]) == (1, 0, 0)
    assert [(f["sop_instance_uid"], f["status"]) for f in delivery["files"]] == [(uid, "stored")]
    # the pseudonym map of the delivered file: its patient can be re-identified under dual control
    pseudonymised = pydicom.dcmread(io.BytesIO(data))
    assert pushworld.pmap.lookup("lung-study", "patient_id", str(pseudonymised.PatientID)) == source_patient(data)
    assert pushworld.pmap.lookup("lung-study", "sop_uid", uid) == source_sop_instance_uid(data)
    # no source identifier in the delivery report nor the error (the cohort names its studies, by design)
    text = json.dumps([status["delivery"], status["error"]])
    for pid, name in SOURCES.items():
        source = pydicom.dcmread(get_testdata_file(name))
        for value in (pid, source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID):
            assert value not in text


def test_a_push_abandoned_after_the_last_attempt_marks_the_batch_in_flight_unconfirmed(pushworld):  # type: ignore[no-untyped-def]
    pushworld.comps.service.ledger.recovery = RecoveryPolicy(max_attempts=1)
    rid = _killed_sending_the_second_batch(pushworld, sent=False)
    pushworld.clock.now += timedelta(seconds=121)
    assert Sweeper(pushworld.comps).sweep()["failed"] == 1
    status = status_of(pushworld, rid)
    assert status["state"] == "failed" and "interrupted 1 time " in status["error"]
    assert [f["status"] for f in status["delivery"]["files"]] == ["stored", "unconfirmed"]
    assert "interrupted while this batch was being sent" in status["delivery"]["files"][1]["reason"]
