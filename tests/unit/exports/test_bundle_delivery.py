"""Bundle delivery (``compliance.exports.bundle_delivery``): only ciphertext on disk, the manifest and
report free of source identifiers, the disclosure audited with the source patients; an attempt that
lost its request writes nothing and leaves no file under the bundle's name."""

from __future__ import annotations

import io
import json
import zipfile
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from compliance.exports.interfaces import ExportNotFound
from compliance.exports.workers import InProcessWorker, Sweeper

from .builders import DANA, FILES, ROB, claimed, new_export, status_of


def test_full_job_bundle_and_disclosure(world):  # type: ignore[no-untyped-def]
    req = world.service.create(ROB, new_export())
    world.service.decide(req["id"], DANA, approve=True, comment="IRB approved")
    worker = InProcessWorker(world.comps)
    assert worker.run_once() == 1
    assert worker.run_once() == 0  # nothing left, nothing run twice
    status = world.service.get(req["id"], reader_id=ROB.user_id, may_read_all=False)
    assert status["state"] == "ready", status
    assert status["progress"] == {"percent": 100.0, "total": 2, "processed": 2, "released": 2, "held_back": 0,
                                  "errors": 0}
    on_disk = Path(world.service.load(req["id"]).bundle_path).read_bytes()
    sources = [pydicom.dcmread(get_testdata_file(f)) for f in FILES]
    # Only ciphertext on disk: no zip signature, no source identifier.
    assert b"PK\x03\x04" not in on_disk and on_disk[:4] == b"CGSE"
    for ds in sources:
        assert str(ds.PatientID).encode() not in on_disk

    with pytest.raises(ExportNotFound):  # the steward is not the requester
        world.service.open_bundle(req["id"], DANA, destination_uri="x")
    bundle = world.service.open_bundle(req["id"], ROB, destination_uri="https://gw/api/v1/exports/x/bundle")
    data = b"".join(bundle.chunks)
    import hashlib

    assert hashlib.sha256(data).hexdigest() == bundle.checksum_sha256 and len(data) == bundle.size
    zf = zipfile.ZipFile(io.BytesIO(data))
    names = zf.namelist()
    assert "manifest.json" in names and "deid-report.json" in names
    dicoms = [n for n in names if n.endswith(".dcm")]
    assert len(dicoms) == 2
    manifest = json.loads(zf.read("manifest.json"))
    assert manifest["summary"]["released"] == 2 and {f["path"] for f in manifest["files"]} == set(dicoms)
    source_ids = {str(ds.PatientID) for ds in sources}
    for name in dicoms:
        out = pydicom.dcmread(io.BytesIO(zf.read(name)))
        assert out.PatientIdentityRemoved == "YES"
        assert str(out.PatientID) not in source_ids
        assert out.StudyInstanceUID not in {ds.StudyInstanceUID for ds in sources}
        # the pseudonym map reverses it
        assert world.pmap.lookup("lung-study", "patient_id", str(out.PatientID)) in source_ids
    blob = zf.read("manifest.json") + zf.read("deid-report.json")
    for ds in sources:
        assert ds.StudyInstanceUID.encode() not in blob and str(ds.PatientID).encode() not in blob

    exports = world.events("110106")
    assert len(exports) == 1
    doc = exports[0]
    assert set(doc["patient.ids"]) == source_ids  # SOURCE ids: accounting of disclosures
    assert doc["recipient"] == "rob" and doc["user.name"] == "rob"
    transfers = world.events("110104")
    assert len(transfers) == 2
    steps = [d["event.outcome_description"] for d in world.events("110109")]
    assert steps == ["export request requested", "export request approved", "export job started on "
                     + steps[2].removeprefix("export job started on "), "export request ready"]


def test_an_attempt_that_lost_its_request_writes_nothing(queued_world):  # type: ignore[no-untyped-def]
    rid, _ = claimed(queued_world)
    queued_world.clock.now += timedelta(seconds=121)
    Sweeper(queued_world.comps).sweep()
    assert queued_world.service.claim(rid, "host:2:1") == 2
    # attempt 1 wakes up and runs to the end: it is refused at its first write, and leaves no file
    assert queued_world.comps.job.run(rid, 1) == "lost"
    assert not (queued_world.tmp / "bundles").exists() or not list((queued_world.tmp / "bundles").iterdir())
    assert status_of(queued_world, rid)["state"] == "running"
    assert queued_world.comps.job.run(rid, 2) == "ready"
    assert [p.name for p in (queued_world.tmp / "bundles").iterdir()] == [f"{rid}.2.bundle"]


def test_a_job_losing_its_lease_while_running_stops_before_the_bundle_takes_its_name(queued_world):  # type: ignore[no-untyped-def]
    rid, _ = claimed(queued_world)
    retrieve = queued_world.archive.retrieve_instance

    def handed_on_meanwhile(*uids):  # type: ignore[no-untyped-def]
        if queued_world.service.load(rid).attempts == 1:
            queued_world.clock.now += timedelta(seconds=121)
            Sweeper(queued_world.comps).sweep()
            assert queued_world.service.claim(rid, "host:2:1") == 2
        return retrieve(*uids)

    queued_world.archive.retrieve_instance = handed_on_meanwhile
    assert queued_world.comps.job.run(rid, 1) == "lost"
    assert not list((queued_world.tmp / "bundles").iterdir())  # no partial, no bundle of the lost attempt
    assert queued_world.service.load(rid).state == "running"
