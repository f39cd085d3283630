"""The export workflow against a real SQLite database, real keys and the real engine.

The archive is an in-memory ArchiveReader serving pydicom's sample files (the end-to-end test
against Orthanc is tests/integration/test_exports.py).
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select

from compliance.audit.atna import AuditSource
from compliance.audit.message import UserRef
from compliance.audit.models import AuditOutboxRow
from compliance.audit.outbox import SqlAuditOutbox
from compliance.audit.recorder import AuditRecorder
from compliance.crypto.interfaces import DecryptionError
from compliance.crypto.providers.local import LocalKeyProvider
from compliance.db.migrate import upgrade
from compliance.db.session import make_engine, make_session_factory
from compliance.dicomweb.reader import multipart_parts
from compliance.exports.interfaces import (
    BundleExpired,
    ExportNotFound,
    ExportStateConflict,
    InvalidExportRequest,
    SelfApprovalRefused,
)
from compliance.exports.jobs import ExportJob
from compliance.exports.keys import ProjectKeyStore, ProviderPseudonymSecretSource, PseudonymMap
from compliance.exports.projects import ProjectRegistry, projects_from_mapping
from compliance.exports.reidentification import ReidentificationService
from compliance.exports.requests import NewExport
from compliance.exports.service import ExportService
from compliance.exports.workers import ExportComponents, InProcessWorker, run_claimed

ROB = UserRef(user_id="sub-rob", username="rob", roles=("researcher",))
DANA = UserRef(user_id="sub-dana", username="dana", roles=("data-steward",))
SAM = UserRef(user_id="sub-sam", username="sam", roles=("data-steward",))
FILES = ["CT_small.dcm", "MR_small.dcm"]
#: The unit world's registry: rob belongs to lung-study by username; other-study is another team's.
PROJECTS = projects_from_mapping({"version": 1, "projects": {
    "lung-study": {"title": "Lung study", "protocols": ["IRB-2026-001"], "members": {"users": ["rob"]}},
    "other-study": {"title": "Another team's study", "members": {"groups": ["/departments/cardiology"]}},
    "alpha": {"title": "a", "members": {"users": ["rob"]}},
    "beta": {"title": "b", "members": {"users": ["rob"]}},
}})


class MemoryArchive:
    def __init__(self) -> None:
        self.instances: dict[tuple[str, str, str], bytes] = {}
        for name in FILES:
            path = get_testdata_file(name)
            ds = pydicom.dcmread(path)
            self.instances[(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)] = Path(path).read_bytes()
        self.closed = 0

    def find_studies(self, filters: dict[str, str]) -> list[str]:
        return sorted({k[0] for k in self.instances})

    def find_instances(self, study_uid: str) -> list[tuple[str, str]]:
        return sorted((se, sop) for st, se, sop in self.instances if st == study_uid)

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
        return self.instances[(study_uid, series_uid, sop_uid)]

    def close(self) -> None:
        self.closed += 1


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def build_world(tmp_path: Path, projects: ProjectRegistry = PROJECTS, **job_options):  # type: ignore[no-untyped-def]
    """The export workflow over a SQLite database, a local keyring and an in-memory archive.

    ``job_options`` go to :class:`ExportJob` (e.g. ``destinations`` and a STOW client factory); the
    registry, when given, is the service's too. ``projects``: the project registry (keys are created for
    its projects only, as in the gateway). Returns a namespace and the engine to dispose.
    """
    warnings.simplefilter("ignore", UserWarning)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    auditor = AuditRecorder(SqlAuditOutbox(engine), AuditSource(source_id="gw", enterprise_site_id="site"))
    provider = LocalKeyProvider(tmp_path / "keyring.json", environment="development", explicit_path=True,
                                create_if_missing=True)
    clock = Clock()
    keys = ProjectKeyStore(sessions, provider, create_kek_if_missing=True, registered=projects.is_registered)
    service = ExportService(sessions, auditor, keys, gateway_id="gw", clock=clock, bundle_ttl=timedelta(days=1),
                            destinations=job_options.get("destinations"), projects=projects)
    pmap = PseudonymMap(sessions, keys)
    archive = MemoryArchive()
    job = ExportJob(service, pmap, auditor, lambda: archive, bundles_dir=tmp_path / "bundles",
                    archive_id="http://archive/dicom-web", **job_options)
    reid = ReidentificationService(sessions, auditor, pmap, gateway_id="gw")
    comps = ExportComponents(service, reid, job, keys)

    def events(code: str) -> list[dict]:
        with sessions() as s:
            return [json.loads(r.document) for r in s.scalars(
                select(AuditOutboxRow).where(AuditOutboxRow.event_code == code).order_by(AuditOutboxRow.seq))]

    world = type("World", (), dict(service=service, comps=comps, archive=archive, clock=clock, events=events,
                                   reid=reid, pmap=pmap, keys=keys, tmp=tmp_path, sessions=sessions))
    return world, engine


@pytest.fixture
def world(tmp_path):  # type: ignore[no-untyped-def]
    built, engine = build_world(tmp_path)
    yield built
    engine.dispose()


def _new(**kw) -> NewExport:  # type: ignore[no-untyped-def]
    base = dict(project="lung-study", protocol="IRB-2026-001", purpose="lung nodule research", profile="basic",
                study_uids=tuple(sorted({k[0] for k in MemoryArchive().instances})))
    return NewExport(**{**base, **kw})


def test_request_validation(world):  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidExportRequest):
        world.service.create(ROB, _new(profile="no-such-profile"))
    with pytest.raises(InvalidExportRequest):
        world.service.create(ROB, _new(study_uids=(), filters=None))
    with pytest.raises(InvalidExportRequest):
        world.service.create(ROB, _new(study_uids=("not a uid",)))
    with pytest.raises(InvalidExportRequest):
        world.service.create(ROB, _new(destination="ftp"))


def test_self_approval_is_refused_and_audited(world):  # type: ignore[no-untyped-def]
    req = world.service.create(ROB, _new())
    with pytest.raises(SelfApprovalRefused):
        world.service.decide(req["id"], ROB, approve=True, comment="mine")
    assert world.service.get(req["id"], reader_id="x", may_read_all=True)["state"] == "requested"
    alerts = world.events("110113")
    assert len(alerts) == 1 and "self-approval" in alerts[0]["event.outcome_description"]


def test_only_requested_can_be_decided_once(world):  # type: ignore[no-untyped-def]
    req = world.service.create(ROB, _new())
    world.service.decide(req["id"], DANA, approve=False, comment="no IRB letter")
    with pytest.raises(ExportStateConflict):
        world.service.decide(req["id"], SAM, approve=True, comment="override")
    assert world.service.get(req["id"], reader_id=ROB.user_id, may_read_all=False)["state"] == "rejected"
    with pytest.raises(ExportNotFound):  # another researcher does not see it
        world.service.get(req["id"], reader_id="sub-other", may_read_all=False)


def test_full_job_bundle_and_disclosure(world):  # type: ignore[no-untyped-def]
    req = world.service.create(ROB, _new())
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


def test_bundle_expires(world):  # type: ignore[no-untyped-def]
    req = world.service.create(ROB, _new())
    world.service.decide(req["id"], DANA, approve=True, comment="ok")
    assert run_claimed(world.comps, req["id"]) == "ready"
    assert run_claimed(world.comps, req["id"]) is None  # a redelivered message is a no-op
    path = Path(world.service.load(req["id"]).bundle_path)
    world.clock.now += timedelta(days=2)
    with pytest.raises(BundleExpired):
        world.service.open_bundle(req["id"], ROB, destination_uri="x")
    assert world.service.expire_due() == 1
    assert not path.exists()
    assert world.service.get(req["id"], reader_id=ROB.user_id, may_read_all=False)["state"] == "expired"
    assert world.events("110106") == []


def test_tampered_bundle_does_not_decrypt(world):  # type: ignore[no-untyped-def]
    req = world.service.create(ROB, _new())
    world.service.decide(req["id"], DANA, approve=True, comment="ok")
    run_claimed(world.comps, req["id"])
    path = Path(world.service.load(req["id"]).bundle_path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(DecryptionError):
        b"".join(world.service.open_bundle(req["id"], ROB, destination_uri="x").chunks)


def test_cohort_without_instances_fails(world):  # type: ignore[no-untyped-def]
    req = world.service.create(ROB, _new(study_uids=("1.2.3.4",)))
    world.service.decide(req["id"], DANA, approve=True, comment="ok")
    assert run_claimed(world.comps, req["id"]) == "failed"
    status = world.service.get(req["id"], reader_id=ROB.user_id, may_read_all=False)
    assert status["state"] == "failed" and "no instance" in status["error"]


def test_reidentification_needs_a_second_steward(world):  # type: ignore[no-untyped-def]
    req = world.service.create(ROB, _new())
    world.service.decide(req["id"], DANA, approve=True, comment="ok")
    run_claimed(world.comps, req["id"])
    data = b"".join(world.service.open_bundle(req["id"], ROB, destination_uri="x").chunks)
    zf = zipfile.ZipFile(io.BytesIO(data))
    out = pydicom.dcmread(io.BytesIO(zf.read(next(n for n in zf.namelist() if n.endswith(".dcm")))))
    pseudonym = str(out.PatientID)
    with pytest.raises(ExportNotFound):
        world.reid.request(DANA, project="lung-study", kind="patient_id", pseudonym="PXNOPE", reason="finding")
    r = world.reid.request(DANA, project="lung-study", kind="patient_id", pseudonym=pseudonym,
                           reason="incidental finding")
    with pytest.raises(ExportStateConflict):
        world.reid.reveal(r["id"], DANA)  # not approved yet
    with pytest.raises(SelfApprovalRefused):
        world.reid.decide(r["id"], DANA, approve=True, comment="me")
    world.reid.decide(r["id"], SAM, approve=True, comment="second approver")
    with pytest.raises(ExportNotFound):
        world.reid.reveal(r["id"], SAM)  # only the one who asked
    revealed = world.reid.reveal(r["id"], DANA)
    sources = {str(pydicom.dcmread(get_testdata_file(f)).PatientID) for f in FILES}
    assert revealed["original"] in sources and revealed["state"] == "revealed"
    with pytest.raises(ExportStateConflict):
        world.reid.reveal(r["id"], DANA)  # once
    records = world.events("110110")
    assert [d["event.action"] for d in records] == ["C", "U", "R"]
    assert records[-1]["patient.ids"] == [revealed["original"]]


def test_pseudonym_secret_from_the_key_provider(world):  # type: ignore[no-untyped-def]
    source = ProviderPseudonymSecretSource(world.keys)
    a = source.secret_for_project("alpha")
    assert len(a) == 32 and a == source.secret_for_project("alpha") != source.secret_for_project("beta")
    from compliance.exports.models import ExportProjectKey

    with world.sessions() as s:
        stored = s.get(ExportProjectKey, ("alpha", "pseudonym")).wrapped_key
    assert a not in stored


def test_map_is_encrypted_at_rest(world):  # type: ignore[no-untyped-def]
    world.pmap.record("alpha", {("patient_id", "MRN-123456", "PXABC")})
    assert world.pmap.record("alpha", {("patient_id", "MRN-123456", "PXABC")}) == 0
    from compliance.exports.models import ExportPseudonym

    with world.sessions() as s:
        row = s.get(ExportPseudonym, ("alpha", "patient_id", "PXABC"))
        assert b"MRN-123456" not in row.original_sealed
    assert world.pmap.lookup("alpha", "patient_id", "PXABC") == "MRN-123456"
    assert world.pmap.lookup("other", "patient_id", "PXABC") is None


def test_multipart_parts():
    body = b"--b1\r\nContent-Type: application/dicom\r\n\r\nDATA\r\n--b1--\r\n"
    assert multipart_parts('multipart/related; type="application/dicom"; boundary=b1', body) == [b"DATA"]


def test_held_back_report_names_where_and_what_never_a_digest_of_the_value(world):  # type: ignore[no-untyped-def]
    """The researcher's deid-report.json: an unsalted hash of a patient ID is reversible by brute force."""
    key = next(k for k in world.archive.instances if pydicom.dcmread(io.BytesIO(world.archive.instances[k])).Modality
               == "MR")
    ds = pydicom.dcmread(io.BytesIO(world.archive.instances[key]))
    ds.Manufacturer = str(ds.PatientID)  # a kept attribute carrying the patient ID: the leak gate holds it back
    buf = io.BytesIO()
    ds.save_as(buf)
    world.archive.instances[key] = buf.getvalue()
    req = world.service.create(ROB, _new())
    world.service.decide(req["id"], DANA, approve=True, comment="IRB approved")
    assert InProcessWorker(world.comps).run_once() == 1
    bundle = world.service.open_bundle(req["id"], ROB, destination_uri="x")
    report = json.loads(zipfile.ZipFile(io.BytesIO(b"".join(bundle.chunks))).read("deid-report.json"))
    held = [f for f in report["files"] if f["status"] == "held_back"]
    assert len(held) == 1 and held[0]["findings"], report
    assert all(set(f) == {"path", "kind"} for f in held[0]["findings"])
    assert "sha256" not in json.dumps(report)


def test_an_archive_error_never_carries_the_source_uids():
    import httpx

    from compliance.dicomweb.reader import DicomwebArchiveReader
    from compliance.errors import UpstreamError

    reader = DicomwebArchiveReader("http://archive", "/dicom-web", username="u", password="p")
    reader._http = httpx.Client(base_url="http://archive", transport=httpx.MockTransport(
        lambda request: httpx.Response(500, text="boom")))
    uids = ("1.2.840.99.1", "1.2.840.99.2", "1.2.840.99.3")
    with pytest.raises(UpstreamError) as failed:
        reader.retrieve_instance(*uids)
    assert failed.value.message == "the archive answered 500 to a retrieve request"
    with pytest.raises(UpstreamError) as failed:
        reader.find_instances(uids[0])
    assert not any(uid in failed.value.message for uid in uids)


def test_a_reveal_that_cannot_look_up_the_pseudonym_does_not_use_the_request_up(world):  # type: ignore[no-untyped-def]
    req = world.service.create(ROB, _new())
    world.service.decide(req["id"], DANA, approve=True, comment="ok")
    run_claimed(world.comps, req["id"])
    data = b"".join(world.service.open_bundle(req["id"], ROB, destination_uri="x").chunks)
    zf = zipfile.ZipFile(io.BytesIO(data))
    first = next(n for n in zf.namelist() if n.endswith(".dcm"))
    pseudonym = str(pydicom.dcmread(io.BytesIO(zf.read(first))).PatientID)
    r = world.reid.request(DANA, project="lung-study", kind="patient_id", pseudonym=pseudonym, reason="finding")
    world.reid.decide(r["id"], SAM, approve=True, comment="second approver")
    lookup = world.pmap.lookup
    world.pmap.lookup = lambda *args: None  # the map cannot answer (e.g. a key being restored)
    with pytest.raises(ExportNotFound):
        world.reid.reveal(r["id"], DANA)
    assert [d["event.action"] for d in world.events("110110")] == ["C", "U"]  # nothing revealed, nothing recorded
    world.pmap.lookup = lookup
    assert world.reid.reveal(r["id"], DANA)["original"]  # still approved: it reveals once it can


def test_an_instance_without_patient_id_is_held_back_so_every_disclosure_names_its_patient(world):  # type: ignore[no-untyped-def]
    key = next(iter(sorted(world.archive.instances)))
    ds = pydicom.dcmread(io.BytesIO(world.archive.instances[key]))
    ds.PatientID = ""
    buf = io.BytesIO()
    ds.save_as(buf)
    world.archive.instances[key] = buf.getvalue()
    req = world.service.create(ROB, _new())
    world.service.decide(req["id"], DANA, approve=True, comment="ok")
    assert run_claimed(world.comps, req["id"]) == "ready"
    status = world.service.get(req["id"], reader_id=ROB.user_id, may_read_all=False)
    assert (status["progress"]["released"], status["progress"]["held_back"]) == (1, 1)
    b"".join(world.service.open_bundle(req["id"], ROB, destination_uri="x").chunks)  # downloadable
    (export,) = world.events("110106")
    assert export["patient.ids"] and all(export["patient.ids"])


def test_reads_of_a_job_that_fails_midway_are_still_audited(world):  # type: ignore[no-untyped-def]
    """Identified instances left the archive for the job: a 110104 each study, whatever happens next."""
    from compliance.errors import UpstreamUnavailable

    retrieve, calls = world.archive.retrieve_instance, []

    def failing_second(study_uid, series_uid, sop_uid):  # type: ignore[no-untyped-def]
        calls.append(sop_uid)
        if len(calls) == 2:
            raise UpstreamUnavailable("the archive cannot be reached")
        return retrieve(study_uid, series_uid, sop_uid)

    world.archive.retrieve_instance = failing_second
    req = world.service.create(ROB, _new())
    world.service.decide(req["id"], DANA, approve=True, comment="ok")
    assert run_claimed(world.comps, req["id"]) == "failed"
    reads = world.events("110104")
    assert len(reads) == 1 and reads[0]["patient.ids"], reads
    assert not list((world.tmp / "bundles").glob("*"))  # and no partial bundle
