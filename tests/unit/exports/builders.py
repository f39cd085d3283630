"""The export domain's unit world: a real SQLite database, real keys and the real engine.

The archive is an in-memory ArchiveReader serving pydicom's sample files; the destination side of a
push is a recording STOW client (the job's contract). The end-to-end tests against Orthanc are
tests/integration/test_exports.py.
"""

from __future__ import annotations

import io
import json
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from sqlalchemy import select

from compliance.audit.atna import AuditSource
from compliance.audit.message import UserRef
from compliance.audit.models import AuditOutboxRow
from compliance.audit.outbox import SqlAuditOutbox
from compliance.audit.recorder import AuditRecorder
from compliance.crypto.providers.local import LocalKeyProvider
from compliance.db.migrate import upgrade
from compliance.db.session import make_engine, make_session_factory
from compliance.exports.destinations import FAILED, STORED, UNCONFIRMED, DicomwebDestination
from compliance.exports.interfaces import ExportQueue
from compliance.exports.jobs import ExportJob
from compliance.exports.keys import ProjectKeyStore, PseudonymMap
from compliance.exports.projects import ProjectRegistry, projects_from_mapping
from compliance.exports.reidentification import ReidentificationService
from compliance.exports.requests import NewExport
from compliance.exports.service import ExportService
from compliance.exports.workers import ExportComponents

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


def build_world(tmp_path: Path, projects: ProjectRegistry = PROJECTS, queue: ExportQueue | None = None,
                **job_options):  # type: ignore[no-untyped-def]
    """The export workflow over a SQLite database, a local keyring and an in-memory archive.

    ``job_options`` go to :class:`ExportJob` (e.g. ``destinations`` and a STOW client factory); the
    registry, when given, is the service's too. ``projects``: the project registry (keys are created for
    its projects only, as in the gateway); ``queue``: where approvals go (None: nowhere, a worker polls).
    Returns a namespace and the engine to dispose.
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
                            destinations=job_options.get("destinations"), projects=projects, queue=queue)
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


def new_export(**kw) -> NewExport:  # type: ignore[no-untyped-def]
    base = dict(project="lung-study", protocol="IRB-2026-001", purpose="lung nodule research", profile="basic",
                study_uids=tuple(sorted({k[0] for k in MemoryArchive().instances})))
    return NewExport(**{**base, **kw})


PACS = DicomwebDestination(name="research-pacs", url="http://research.example/dicom-web",
                           description="lab archive", projects=frozenset({"lung-study"}))

SOURCES = {str(pydicom.dcmread(get_testdata_file(f)).PatientID): f for f in FILES}


def source_patient(data: bytes) -> str:
    """The source PatientID of a pseudonymised instance (the modality tells CT from MR)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    return next(pid for pid, f in SOURCES.items() if f.startswith(str(ds.Modality)))


class RecordingStow:
    """The destination side of the job's contract: records every batch, fails the UIDs it is told to."""

    def __init__(self, fail: set[str] | None = None, unconfirmed: set[str] | None = None) -> None:
        self.batches: list[list[tuple[str, bytes]]] = []
        self.fail_patients = fail or set()
        self.unconfirmed_patients = unconfirmed or set()
        self.closed = False

    def store(self, instances):  # type: ignore[no-untyped-def]
        self.batches.append(list(instances))
        out = {}
        for uid, data in instances:
            source_pid = source_patient(data)
            if source_pid in self.fail_patients:
                out[uid] = (FAILED, "destination refused the instance: out of resources")
            elif source_pid in self.unconfirmed_patients:
                out[uid] = (UNCONFIRMED, "no answer from the destination (ReadTimeout)")
            else:
                out[uid] = (STORED, None)
        return out

    def close(self) -> None:
        self.closed = True


class Queue:
    name = "test-queue"

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.down = False

    def enqueue(self, request_id: str) -> None:
        if self.down:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
        self.sent.append(request_id)


def status_of(world, rid):  # type: ignore[no-untyped-def]
    return world.service.get(rid, reader_id=ROB.user_id, may_read_all=True)


def claimed(world) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    rid = world.service.create(ROB, new_export())["id"]
    world.service.decide(rid, DANA, approve=True, comment="ok")
    attempt = world.service.claim(rid, "host:1:1")
    assert attempt == 1
    return rid, attempt
