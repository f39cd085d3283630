"""Recovery of export jobs: dispatch after a queue failure, leases and the sweep, idempotent re-runs,
and the per-batch delivery record of a push that stops mid-way.

Pure decisions first (``compliance.exports.recovery``), then the workflow over the real SQLite
database, keys and engine of test_workflow (a fake clock moves leases past their end; a
``BaseException`` raised inside the job stands for the worker being killed: nothing of the job's own
error handling runs, as with kill -9).
"""

from __future__ import annotations

import io
import json
import threading
import zipfile
from datetime import UTC, datetime, timedelta

import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select

from compliance.errors import ConfigurationError, UpstreamUnavailable
from compliance.exports.destinations import STORED, DestinationRegistry
from compliance.exports.models import ExportDeliveryFile, ExportPseudonym
from compliance.exports.recovery import (
    LeaseKeeper,
    LeaseLost,
    RecoveryPolicy,
    bundle_file_name,
    dispatch_due,
    lease_expired,
    running_decision,
)
from compliance.exports.workers import InProcessWorker, Sweeper, run_claimed

from .test_destinations import PACS, SOURCES, RecordingStow
from .test_workflow import DANA, ROB, _new, build_world

T0 = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = RecoveryPolicy(lease_seconds=120, max_attempts=3, dispatch_grace_seconds=10, redispatch_after_seconds=600)


# --------------------------------------------------------------------------- pure decisions

def test_policy_from_settings(monkeypatch):
    from compliance.config import Settings

    monkeypatch.setenv("COMPLIANCE_EXPORTS_LEASE_SECONDS", "30")
    monkeypatch.setenv("COMPLIANCE_EXPORTS_MAX_ATTEMPTS", "5")
    policy = RecoveryPolicy.from_settings(Settings(exports_sweep_interval_seconds=2))
    assert (policy.lease_seconds, policy.max_attempts, policy.sweep_interval_seconds) == (30.0, 5, 2.0)
    assert policy.heartbeat_seconds == 7.5
    monkeypatch.delenv("COMPLIANCE_EXPORTS_LEASE_SECONDS")
    monkeypatch.delenv("COMPLIANCE_EXPORTS_MAX_ATTEMPTS")
    assert RecoveryPolicy.from_settings(Settings()) == RecoveryPolicy()
    with pytest.raises(ConfigurationError):
        RecoveryPolicy.from_settings(Settings(exports_max_attempts=0))
    with pytest.raises(ConfigurationError):
        RecoveryPolicy(lease_seconds=0)


def test_lease_expiry():
    def expired(lease, started=None, now=T0):  # type: ignore[no-untyped-def]
        return lease_expired(lease_expires_at=lease, started_at=started, now=now, policy=POLICY)

    assert not expired(T0 + timedelta(seconds=1))
    assert expired(T0)  # the end of the lease is the end
    assert expired(T0 - timedelta(seconds=1))
    assert expired((T0 - timedelta(seconds=1)).replace(tzinfo=None))  # SQLite gives naive UTC back
    # a row running since before leases existed: expired a long while after it started, not at once
    assert not expired(None, started=T0 - timedelta(hours=1))
    assert expired(None, started=T0 - timedelta(seconds=POLICY.legacy_running_seconds))
    assert not expired(None, started=None)


@pytest.mark.parametrize(("attempts", "lease", "decision"), [
    (1, T0 + timedelta(seconds=5), "keep"),
    (1, T0 - timedelta(seconds=5), "requeue"),
    (2, T0 - timedelta(seconds=5), "requeue"),
    (3, T0 - timedelta(seconds=5), "fail"),  # max_attempts = 3: the third interrupted attempt is the last
    (3, T0 + timedelta(seconds=5), "keep"),
    (7, T0 - timedelta(seconds=5), "fail"),
])
def test_running_decision(attempts, lease, decision):  # type: ignore[no-untyped-def]
    assert running_decision(attempts=attempts, lease_expires_at=lease, started_at=T0 - timedelta(minutes=5), now=T0,
                            policy=POLICY) == decision


def test_dispatch_decision():
    def due(decided, dispatched):  # type: ignore[no-untyped-def]
        return dispatch_due(decided_at=decided, dispatched_at=dispatched, now=T0, policy=POLICY)

    # never dispatched: the approving gateway's own attempt gets the grace period, then the sweep takes over
    assert not due(T0 - timedelta(seconds=9), None)
    assert due(T0 - timedelta(seconds=10), None)
    assert due(None, None)
    # dispatched: again only when nobody claimed it for a long time (a lost message)
    assert not due(T0 - timedelta(hours=1), T0 - timedelta(seconds=599))
    assert due(T0 - timedelta(hours=1), T0 - timedelta(seconds=600))


def test_bundle_names_never_collide_across_attempts():
    names = {bundle_file_name("r", n) for n in (1, 2, 3)}
    assert names == {"r.bundle", "r.2.bundle", "r.3.bundle"}


def test_lease_keeper_flags_a_lost_lease():
    calls = []
    renewed = threading.Event()

    def renew() -> bool:
        calls.append(1)
        renewed.set()
        return len(calls) < 2  # the second renewal finds the request handed on

    with LeaseKeeper(renew, interval_seconds=0.01) as lease:
        assert lease.lost.wait(10), "the keeper never noticed"
        with pytest.raises(LeaseLost):
            lease.check()
    assert len(calls) == 2  # it stops renewing once lost


# --------------------------------------------------------------------------- dispatch (defect 1)

class Queue:
    name = "test-queue"

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.down = False

    def enqueue(self, request_id: str) -> None:
        if self.down:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
        self.sent.append(request_id)


@pytest.fixture
def world(tmp_path):  # type: ignore[no-untyped-def]
    built, engine = build_world(tmp_path)
    built.queue = Queue()
    built.service.requests.queue = built.queue
    yield built
    engine.dispose()


def _status(world, rid):  # type: ignore[no-untyped-def]
    return world.service.get(rid, reader_id=ROB.user_id, may_read_all=True)


def test_an_approval_stands_when_the_queue_is_down_and_the_sweep_dispatches_it(world):  # type: ignore[no-untyped-def]
    rid = world.service.create(ROB, _new())["id"]
    world.queue.down = True
    answer = world.service.decide(rid, DANA, approve=True, comment="IRB approved")
    assert answer["state"] == "approved" and answer["approver"]["username"] == "dana"
    assert answer["dispatch"]["status"] == "pending" and "dispatched automatically" in answer["dispatch"]["detail"]
    assert answer["dispatched_at"] is None and world.queue.sent == []
    assert [d["event.outcome_description"] for d in world.events("110109")][-1] == "export request approved"

    world.queue.down = False
    sweeper = Sweeper(world.comps)
    assert sweeper.sweep()["dispatched"] == 0  # within the grace period the approving gateway has
    world.clock.now += timedelta(seconds=11)
    assert sweeper.sweep()["dispatched"] == 1
    assert world.queue.sent == [rid] and _status(world, rid)["dispatched_at"] is not None
    assert sweeper.sweep()["dispatched"] == 0  # dispatched once, not at every sweep
    world.clock.now += timedelta(seconds=600)  # nobody claimed it: the message was lost
    assert sweeper.sweep()["dispatched"] == 1 and world.queue.sent == [rid, rid]

    assert run_claimed(world.comps, rid) == "ready"
    assert run_claimed(world.comps, rid) is None  # the duplicate message is a no-op
    assert _status(world, rid)["attempts"] == 1


def test_an_approval_dispatched_at_once_when_the_queue_is_up(world):  # type: ignore[no-untyped-def]
    rid = world.service.create(ROB, _new())["id"]
    answer = world.service.decide(rid, DANA, approve=True, comment="ok")
    assert answer["dispatch"]["status"] == "dispatched" and answer["dispatched_at"] is not None
    assert world.queue.sent == [rid]
    world.clock.now += timedelta(seconds=60)
    assert Sweeper(world.comps).sweep()["dispatched"] == 0


def test_a_failed_redispatch_is_retried(world):  # type: ignore[no-untyped-def]
    rid = world.service.create(ROB, _new())["id"]
    world.queue.down = True
    world.service.decide(rid, DANA, approve=True, comment="ok")
    world.clock.now += timedelta(seconds=11)
    assert Sweeper(world.comps).sweep()["dispatched"] == 0  # still down
    assert _status(world, rid)["dispatched_at"] is None
    world.queue.down = False
    assert Sweeper(world.comps).sweep()["dispatched"] == 1


# --------------------------------------------------------------------------- leases and the sweep (defect 2)

def _claimed(world) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    rid = world.service.create(ROB, _new())["id"]
    world.service.decide(rid, DANA, approve=True, comment="ok")
    attempt = world.service.claim(rid, "host:1:1")
    assert attempt == 1
    return rid, attempt


def test_a_running_job_whose_lease_expired_is_requeued_then_failed_after_the_last_attempt(world):  # type: ignore[no-untyped-def]
    rid, _ = _claimed(world)
    sweeper = Sweeper(world.comps)
    world.clock.now += timedelta(seconds=100)
    assert world.service.renew_lease(rid, 1)  # a live worker keeps it
    world.clock.now += timedelta(seconds=100)
    assert sweeper.sweep()["requeued"] == 0
    world.clock.now += timedelta(seconds=121)  # the worker died: no renewal for a whole lease
    assert sweeper.sweep()["requeued"] == 1
    status = _status(world, rid)
    assert (status["state"], status["attempts"]) == ("approved", 1)
    assert world.queue.sent == [rid, rid]  # at the approval, and again by the sweep that requeued it
    requeued = [d for d in world.events("110109") if "queued again" in d["event.outcome_description"]]
    assert len(requeued) == 1 and "attempt 2 of 3" in requeued[0]["event.outcome_description"]
    assert requeued[0]["event.outcome"] == 4
    # the old attempt can no longer write anything
    assert world.service.claim(rid, "host:2:1") == 2
    assert not world.service.progress(rid, attempt=1, processed=1)
    assert not world.service.renew_lease(rid, 1)
    assert not world.service.fail(rid, "from a zombie", attempt=1)
    assert _status(world, rid)["state"] == "running"

    world.clock.now += timedelta(seconds=121)
    sweeper.sweep()
    assert world.service.claim(rid, "host:3:1") == 3
    world.clock.now += timedelta(seconds=121)
    assert sweeper.sweep()["failed"] == 1
    status = _status(world, rid)
    assert status["state"] == "failed" and status["attempts"] == 3
    assert status["error"].startswith("the export job was interrupted 3 times")
    assert sweeper.sweep() == {"requeued": 0, "failed": 0, "dispatched": 0, "expired": 0}


def test_the_in_process_worker_recovers_and_completes_a_job_left_running(world):  # type: ignore[no-untyped-def]
    """A bundle job killed after its bundle was renamed but before it was recorded, and one killed
    mid-write: the next attempt removes both leftovers and produces exactly one bundle."""
    rid, _ = _claimed(world)
    bundles = world.tmp / "bundles"
    bundles.mkdir()
    (bundles / f".{rid}.1.bundle.part").write_bytes(b"half a bundle")
    (bundles / f"{rid}.bundle").write_bytes(b"a complete bundle the request never recorded")
    world.clock.now += timedelta(seconds=121)
    worker = InProcessWorker(world.comps)
    assert worker.run_once() == 1  # the sweep requeued it, the poll ran it
    status = _status(world, rid)
    assert status["state"] == "ready" and status["attempts"] == 2
    assert sorted(p.name for p in bundles.iterdir()) == [f"{rid}.2.bundle"]
    assert world.service.load(rid).bundle_path == str(bundles / f"{rid}.2.bundle")
    data = b"".join(world.service.open_bundle(rid, ROB, destination_uri="x").chunks)
    assert len([n for n in zipfile.ZipFile(io.BytesIO(data)).namelist() if n.endswith(".dcm")]) == 2
    assert len(world.events("110106")) == 1  # the one download


def test_a_running_job_renews_its_lease(world):  # type: ignore[no-untyped-def]
    """run_claimed keeps the lease alive from its own thread, however long one step of the job takes."""
    world.service.ledger.recovery = RecoveryPolicy(lease_seconds=0.2)
    renew, renewals, twice = world.service.renew_lease, [], threading.Event()

    def counted(request_id: str, attempt: int) -> bool:
        renewals.append(attempt)
        if len(renewals) >= 2:
            twice.set()
        return renew(request_id, attempt)

    world.service.renew_lease = counted
    retrieve = world.archive.retrieve_instance

    def slow(*uids):  # type: ignore[no-untyped-def]
        assert twice.wait(10), "the lease was not renewed while the job waited"
        return retrieve(*uids)

    world.archive.retrieve_instance = slow
    rid = world.service.create(ROB, _new())["id"]
    world.service.decide(rid, DANA, approve=True, comment="ok")
    assert run_claimed(world.comps, rid) == "ready"
    assert set(renewals) == {1}


def test_an_attempt_that_lost_its_request_writes_nothing(world):  # type: ignore[no-untyped-def]
    rid, _ = _claimed(world)
    world.clock.now += timedelta(seconds=121)
    Sweeper(world.comps).sweep()
    assert world.service.claim(rid, "host:2:1") == 2
    # attempt 1 wakes up and runs to the end: it is refused at its first write, and leaves no file
    assert world.comps.job.run(rid, 1) == "lost"
    assert not (world.tmp / "bundles").exists() or not list((world.tmp / "bundles").iterdir())
    assert _status(world, rid)["state"] == "running"
    assert world.comps.job.run(rid, 2) == "ready"
    assert [p.name for p in (world.tmp / "bundles").iterdir()] == [f"{rid}.2.bundle"]


def test_a_job_losing_its_lease_while_running_stops_before_the_bundle_takes_its_name(world):  # type: ignore[no-untyped-def]
    rid, _ = _claimed(world)
    retrieve = world.archive.retrieve_instance

    def handed_on_meanwhile(*uids):  # type: ignore[no-untyped-def]
        if world.service.load(rid).attempts == 1:
            world.clock.now += timedelta(seconds=121)
            Sweeper(world.comps).sweep()
            assert world.service.claim(rid, "host:2:1") == 2
        return retrieve(*uids)

    world.archive.retrieve_instance = handed_on_meanwhile
    assert world.comps.job.run(rid, 1) == "lost"
    assert not list((world.tmp / "bundles").iterdir())  # no partial, no bundle of the lost attempt
    assert world.service.load(rid).state == "running"


# --------------------------------------------------------------------------- a push stopped mid-way (defect 3)

class Killed(BaseException):
    """The worker process dies (kill -9): no handler of the job runs."""


@pytest.fixture
def pushworld(tmp_path):  # type: ignore[no-untyped-def]
    stow = RecordingStow()
    built, engine = build_world(tmp_path, destinations=DestinationRegistry([PACS]),
                                stow_client_factory=lambda dest: stow, stow_batch_instances=1)
    built.stow = stow

    def approved() -> str:
        req = built.service.create(ROB, _new(destination={"kind": "dicomweb", "name": "research-pacs"}))
        built.service.decide(req["id"], DANA, approve=True, comment="IRB approved")
        return req["id"]

    built.approved = approved
    yield built
    engine.dispose()


def _map_rows(world) -> set[tuple[str, str]]:  # type: ignore[no-untyped-def]
    with world.sessions() as s:
        return {(r.kind, r.pseudonym) for r in s.scalars(select(ExportPseudonym))}


def _source_of(data: bytes) -> str:
    return RecordingStow._source(data)


def test_a_push_killed_mid_way_keeps_what_was_delivered_and_a_rerun_sends_only_the_rest(pushworld):  # type: ignore[no-untyped-def]
    store = pushworld.stow.store

    def dies_on_the_second_batch(items):  # type: ignore[no-untyped-def]
        if len(pushworld.stow.batches) == 1:
            pushworld.stow.batches.append(list(items))
            raise Killed()
        return store(items)

    pushworld.stow.store = dies_on_the_second_batch
    rid = pushworld.approved()
    with pytest.raises(Killed):
        run_claimed(pushworld.comps, rid)
    first, second = (batch[0] for batch in pushworld.stow.batches)

    # What the request shows after the crash: the first file stored, the second on its way.
    status = _status(pushworld, rid)
    assert status["state"] == "running"
    delivery = status["delivery"]
    assert (delivery["stored"], delivery["sending"], delivery["recorded"]) == (1, 1, "per batch")
    assert [(f["sop_instance_uid"], f["status"]) for f in delivery["files"]] == [(first[0], "stored"),
                                                                                 (second[0], "sending")]
    # The map of what was disclosed is kept: the pseudonymised UIDs of both batches reverse to their source.
    assert {("sop_uid", first[0]), ("sop_uid", second[0])} <= _map_rows(pushworld)
    for uid, data in ((first[0], first[1]), (second[0], second[1])):
        source = pydicom.dcmread(io.BytesIO(data))
        assert pushworld.pmap.lookup("lung-study", "patient_id", str(source.PatientID)) == _source_of(data)
        assert pushworld.pmap.lookup("lung-study", "sop_uid", uid) is not None
    attempts_audited = pushworld.events("110106")
    assert [(d["patient.ids"], d["event.outcome"]) for d in attempts_audited] == \
        [([_source_of(first[1])], 0), ([_source_of(second[1])], 0)]

    # The lease runs out; the sweep requeues; the re-run sends only what was not stored.
    pushworld.stow.store = store
    pushworld.clock.now += timedelta(seconds=121)
    assert Sweeper(pushworld.comps).sweep()["requeued"] == 1
    assert run_claimed(pushworld.comps, rid) == "ready"
    assert [b[0][0] for b in pushworld.stow.batches] == [first[0], second[0], second[0]]
    status = _status(pushworld, rid)
    assert status["attempts"] == 2 and status["error"] is None
    delivery = status["delivery"]
    assert (delivery["stored"], delivery["failed"], delivery["unconfirmed"]) == (2, 0, 0)
    assert [(f["sop_instance_uid"], f["status"], f["attempt"]) for f in delivery["files"]] == \
        [(first[0], STORED, 1), (second[0], STORED, 2)]
    # The file stored before the crash was not disclosed again; the one in flight was sent again, and says so.
    docs = pushworld.events("110106")
    assert [(d["patient.ids"], d["event.outcome"]) for d in docs] == \
        [([_source_of(first[1])], 0), ([_source_of(second[1])], 0), ([_source_of(second[1])], 0)]
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
    status = _status(pushworld, rid)
    assert status["state"] == "failed"
    assert status["error"].startswith("the archive cannot be reached (before the job stopped: 1 instances stored "
                                      "at research-pacs")
    delivery = status["delivery"]
    assert (delivery["stored"], delivery["failed"], delivery["unconfirmed"]) == (1, 0, 0)
    assert [(f["sop_instance_uid"], f["status"]) for f in delivery["files"]] == [(uid, "stored")]
    # the pseudonym map of the delivered file: its patient can be re-identified under dual control
    pseudonymised = pydicom.dcmread(io.BytesIO(data))
    assert pushworld.pmap.lookup("lung-study", "patient_id", str(pseudonymised.PatientID)) == _source_of(data)
    assert pushworld.pmap.lookup("lung-study", "sop_uid", uid) is not None
    # no source identifier in the delivery report nor the error (the cohort names its studies, by design)
    text = json.dumps([status["delivery"], status["error"]])
    for pid, name in SOURCES.items():
        source = pydicom.dcmread(get_testdata_file(name))
        for value in (pid, source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID):
            assert value not in text


def test_a_push_abandoned_after_the_last_attempt_marks_the_batch_in_flight_unconfirmed(pushworld):  # type: ignore[no-untyped-def]
    pushworld.comps.service.ledger.recovery = RecoveryPolicy(max_attempts=1)
    store = pushworld.stow.store

    def dies_on_the_second_batch(items):  # type: ignore[no-untyped-def]
        if len(pushworld.stow.batches) == 1:
            raise Killed()
        return store(items)

    pushworld.stow.store = dies_on_the_second_batch
    rid = pushworld.approved()
    with pytest.raises(Killed):
        run_claimed(pushworld.comps, rid)
    pushworld.clock.now += timedelta(seconds=121)
    assert Sweeper(pushworld.comps).sweep()["failed"] == 1
    status = _status(pushworld, rid)
    assert status["state"] == "failed" and "interrupted 1 time " in status["error"]
    assert [f["status"] for f in status["delivery"]["files"]] == ["stored", "unconfirmed"]
    assert "interrupted while this batch was being sent" in status["delivery"]["files"][1]["reason"]
