"""What both deliveries share (``compliance.exports.pipeline``): the plan, held-back instances and their
report (where and what kind, never a digest), the PatientID a disclosure needs, and the audit of
every read from the archive however the job ends."""

from __future__ import annotations

import io
import json
import zipfile

import pydicom

from compliance.errors import UpstreamUnavailable
from compliance.exports.workers import InProcessWorker, run_claimed

from .builders import DANA, ROB, new_export


def test_cohort_without_instances_fails(world):  # type: ignore[no-untyped-def]
    req = world.service.create(ROB, new_export(study_uids=("1.2.3.4",)))
    world.service.decide(req["id"], DANA, approve=True, comment="ok")
    assert run_claimed(world.comps, req["id"]) == "failed"
    status = world.service.get(req["id"], reader_id=ROB.user_id, may_read_all=False)
    assert status["state"] == "failed" and "no instance" in status["error"]


def test_held_back_report_names_where_and_what_never_a_digest_of_the_value(world):  # type: ignore[no-untyped-def]
    """The researcher's deid-report.json: an unsalted hash of a patient ID is reversible by brute force."""
    key = next(k for k in world.archive.instances if pydicom.dcmread(io.BytesIO(world.archive.instances[k])).Modality
               == "MR")
    ds = pydicom.dcmread(io.BytesIO(world.archive.instances[key]))
    ds.Manufacturer = str(ds.PatientID)  # a kept attribute carrying the patient ID: the leak gate holds it back
    buf = io.BytesIO()
    ds.save_as(buf)
    world.archive.instances[key] = buf.getvalue()
    req = world.service.create(ROB, new_export())
    world.service.decide(req["id"], DANA, approve=True, comment="IRB approved")
    assert InProcessWorker(world.comps).run_once() == 1
    bundle = world.service.open_bundle(req["id"], ROB, destination_uri="x")
    report = json.loads(zipfile.ZipFile(io.BytesIO(b"".join(bundle.chunks))).read("deid-report.json"))
    held = [f for f in report["files"] if f["status"] == "held_back"]
    assert len(held) == 1 and held[0]["findings"], report
    assert all(set(f) == {"path", "kind"} for f in held[0]["findings"])
    assert "sha256" not in json.dumps(report)


def test_an_instance_without_patient_id_is_held_back_so_every_disclosure_names_its_patient(world):  # type: ignore[no-untyped-def]
    key = next(iter(sorted(world.archive.instances)))
    ds = pydicom.dcmread(io.BytesIO(world.archive.instances[key]))
    ds.PatientID = ""
    buf = io.BytesIO()
    ds.save_as(buf)
    world.archive.instances[key] = buf.getvalue()
    req = world.service.create(ROB, new_export())
    world.service.decide(req["id"], DANA, approve=True, comment="ok")
    assert run_claimed(world.comps, req["id"]) == "ready"
    status = world.service.get(req["id"], reader_id=ROB.user_id, may_read_all=False)
    assert (status["progress"]["released"], status["progress"]["held_back"]) == (1, 1)
    b"".join(world.service.open_bundle(req["id"], ROB, destination_uri="x").chunks)  # downloadable
    (export,) = world.events("110106")
    assert export["patient.ids"] and all(export["patient.ids"])


def test_reads_of_a_job_that_fails_midway_are_still_audited(world):  # type: ignore[no-untyped-def]
    """Identified instances left the archive for the job: a 110104 each study, whatever happens next."""

    retrieve, calls = world.archive.retrieve_instance, []

    def failing_second(study_uid, series_uid, sop_uid):  # type: ignore[no-untyped-def]
        calls.append(sop_uid)
        if len(calls) == 2:
            raise UpstreamUnavailable("the archive cannot be reached")
        return retrieve(study_uid, series_uid, sop_uid)

    world.archive.retrieve_instance = failing_second
    req = world.service.create(ROB, new_export())
    world.service.decide(req["id"], DANA, approve=True, comment="ok")
    assert run_claimed(world.comps, req["id"]) == "failed"
    reads = world.events("110104")
    assert len(reads) == 1 and reads[0]["patient.ids"], reads
    assert not list((world.tmp / "bundles").glob("*"))  # and no partial bundle
