"""The job ledger (``compliance.exports.ledger``): leases, their renewal, and the sweep that requeues or
fails a running request whose lease expired (a fake clock moves leases past their end)."""

from __future__ import annotations

import io
import threading
import zipfile
from datetime import timedelta

from compliance.exports.recovery import RecoveryPolicy
from compliance.exports.workers import InProcessWorker, Sweeper, run_claimed

from .builders import DANA, ROB, claimed, new_export, status_of


def test_a_running_job_whose_lease_expired_is_requeued_then_failed_after_the_last_attempt(queued_world):  # type: ignore[no-untyped-def]
    rid, _ = claimed(queued_world)
    sweeper = Sweeper(queued_world.comps)
    queued_world.clock.now += timedelta(seconds=100)
    assert queued_world.service.renew_lease(rid, 1)  # a live worker keeps it
    queued_world.clock.now += timedelta(seconds=100)
    assert sweeper.sweep()["requeued"] == 0
    queued_world.clock.now += timedelta(seconds=121)  # the worker died: no renewal for a whole lease
    assert sweeper.sweep()["requeued"] == 1
    status = status_of(queued_world, rid)
    assert (status["state"], status["attempts"]) == ("approved", 1)
    assert queued_world.queue.sent == [rid, rid]  # at the approval, and again by the sweep that requeued it
    requeued = [d for d in queued_world.events("110109") if "queued again" in d["event.outcome_description"]]
    assert len(requeued) == 1 and "attempt 2 of 3" in requeued[0]["event.outcome_description"]
    assert requeued[0]["event.outcome"] == 4
    # the old attempt can no longer write anything
    assert queued_world.service.claim(rid, "host:2:1") == 2
    assert not queued_world.service.progress(rid, attempt=1, processed=1)
    assert not queued_world.service.renew_lease(rid, 1)
    assert not queued_world.service.fail(rid, "from a zombie", attempt=1)
    assert status_of(queued_world, rid)["state"] == "running"

    queued_world.clock.now += timedelta(seconds=121)
    sweeper.sweep()
    assert queued_world.service.claim(rid, "host:3:1") == 3
    queued_world.clock.now += timedelta(seconds=121)
    assert sweeper.sweep()["failed"] == 1
    status = status_of(queued_world, rid)
    assert status["state"] == "failed" and status["attempts"] == 3
    assert status["error"].startswith("the export job was interrupted 3 times")
    assert sweeper.sweep() == {"requeued": 0, "failed": 0, "dispatched": 0, "expired": 0}


def test_the_in_process_worker_recovers_and_completes_a_job_left_running(queued_world):  # type: ignore[no-untyped-def]
    """A bundle job killed after its bundle was renamed but before it was recorded, and one killed
    mid-write: the next attempt removes both leftovers and produces exactly one bundle."""
    rid, _ = claimed(queued_world)
    bundles = queued_world.tmp / "bundles"
    bundles.mkdir()
    (bundles / f".{rid}.1.bundle.part").write_bytes(b"half a bundle")
    (bundles / f"{rid}.bundle").write_bytes(b"a complete bundle the request never recorded")
    queued_world.clock.now += timedelta(seconds=121)
    worker = InProcessWorker(queued_world.comps)
    assert worker.run_once() == 1  # the sweep requeued it, the poll ran it
    status = status_of(queued_world, rid)
    assert status["state"] == "ready" and status["attempts"] == 2
    assert sorted(p.name for p in bundles.iterdir()) == [f"{rid}.2.bundle"]
    assert queued_world.service.load(rid).bundle_path == str(bundles / f"{rid}.2.bundle")
    data = b"".join(queued_world.service.open_bundle(rid, ROB, destination_uri="x").chunks)
    assert len([n for n in zipfile.ZipFile(io.BytesIO(data)).namelist() if n.endswith(".dcm")]) == 2
    assert len(queued_world.events("110106")) == 1  # the one download


def test_a_running_job_renews_its_lease(queued_world):  # type: ignore[no-untyped-def]
    """run_claimed keeps the lease alive from its own thread, however long one step of the job takes."""
    queued_world.service.ledger.recovery = RecoveryPolicy(lease_seconds=0.2)
    renew, renewals, twice = queued_world.service.renew_lease, [], threading.Event()

    def counted(request_id: str, attempt: int) -> bool:
        renewals.append(attempt)
        if len(renewals) >= 2:
            twice.set()
        return renew(request_id, attempt)

    queued_world.service.renew_lease = counted
    retrieve = queued_world.archive.retrieve_instance

    def slow(*uids):  # type: ignore[no-untyped-def]
        assert twice.wait(10), "the lease was not renewed while the job waited"
        return retrieve(*uids)

    queued_world.archive.retrieve_instance = slow
    rid = queued_world.service.create(ROB, new_export())["id"]
    queued_world.service.decide(rid, DANA, approve=True, comment="ok")
    assert run_claimed(queued_world.comps, rid) == "ready"
    assert set(renewals) == {1}
