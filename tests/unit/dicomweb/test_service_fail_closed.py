"""Fail closed: when the audit event cannot be recorded, no PHI leaves the gateway (pure logic)."""

from __future__ import annotations

import httpx
import pytest

from compliance.audit.atna import AuditSource
from compliance.audit.outbox import SqlAuditOutbox
from compliance.audit.recorder import AuditRecorder
from compliance.auth.interfaces import Principal
from compliance.db.migrate import upgrade
from compliance.db.session import make_engine
from compliance.dicomweb.interfaces import KeyCustodian, RequestContext, StudySummary
from compliance.dicomweb.routing import classify
from compliance.dicomweb.service import DicomwebService
from compliance.errors import AuditFailure, PermissionDenied
from compliance.policy.rbac import RbacPolicy

STUDY = "1.2.3.4"


class ClosingStream(httpx.AsyncByteStream):
    def __init__(self) -> None:
        self.closed = False

    async def __aiter__(self):
        yield b"PHI BYTES"

    async def aclose(self) -> None:
        self.closed = True


class FakeArchive:
    def __init__(self) -> None:
        self.stream = ClosingStream()
        self.sent: list[str] = []

    async def send(self, method, path, *, query=None, headers=None, content=None):
        self.sent.append(path)
        return httpx.Response(200, headers={"content-type": "application/dicom"}, stream=self.stream)

    async def study_summary(self, study_uid):
        return StudySummary(study_uid, "PID-1", "Doe^Jane")

    async def aclose(self):
        pass


def ctx(*roles: str, path: str = f"/studies/{STUDY}") -> RequestContext:
    return RequestContext(Principal("sub", "alice", frozenset(roles), client_id="viewer"), "127.0.0.1", "GET",
                          path, [], "", {"accept": "application/dicom"})


def service(outbox: SqlAuditOutbox, archive: FakeArchive, erasure: KeyCustodian | None = None) -> DicomwebService:
    policy = RbacPolicy.from_mapping({"version": 1, "roles": {"clinician": ["dicomweb:study:read"]}})
    auditor = AuditRecorder(outbox, AuditSource(source_id="gw", enterprise_site_id="site"), fail_closed=True)
    return DicomwebService(archive, policy, auditor, gateway_id="gw", erasure=erasure)


async def test_retrieve_is_refused_and_upstream_closed_when_audit_fails(tmp_path):
    outbox = SqlAuditOutbox(make_engine(f"sqlite:///{tmp_path / 'no-table.db'}"))
    archive = FakeArchive()
    with pytest.raises(AuditFailure):
        await service(outbox, archive).retrieve(ctx("clinician"), classify("GET", f"/studies/{STUDY}"))
    assert archive.stream.closed
    outbox.close()


async def test_retrieve_succeeds_once_the_event_is_durable(tmp_path):
    url = f"sqlite:///{tmp_path / 'ok.db'}"
    upgrade(url)
    outbox = SqlAuditOutbox(make_engine(url))
    archive = FakeArchive()
    upstream = await service(outbox, archive).retrieve(ctx("clinician"), classify("GET", f"/studies/{STUDY}"))
    assert upstream.status_code == 200
    assert outbox.total() == 1
    doc = outbox.pending(10)[0][2]
    assert doc["event.id"] == "110104"
    assert doc["patient.ids"] == ["PID-1"]
    await upstream.aclose()
    outbox.close()


async def test_denial_never_reaches_the_archive(tmp_path):
    url = f"sqlite:///{tmp_path / 'deny.db'}"
    upgrade(url)
    outbox = SqlAuditOutbox(make_engine(url))
    archive = FakeArchive()
    with pytest.raises(PermissionDenied):
        await service(outbox, archive).retrieve(ctx("researcher"), classify("GET", f"/studies/{STUDY}"))
    assert archive.sent == []
    assert outbox.pending(10)[0][2]["event.id"] == "110113"
    outbox.close()


async def test_fail_open_deployments_serve_and_log_loudly(tmp_path, caplog):
    """AUDIT_FAIL_CLOSED=false is a per-deployment choice: the request proceeds, the loss is logged."""
    outbox = SqlAuditOutbox(make_engine(f"sqlite:///{tmp_path / 'no-table.db'}"))
    policy = RbacPolicy.from_mapping({"version": 1, "roles": {"clinician": ["dicomweb:study:read"]}})
    auditor = AuditRecorder(outbox, AuditSource(source_id="gw", enterprise_site_id="site"), fail_closed=False)
    archive = FakeArchive()
    svc = DicomwebService(archive, policy, auditor, gateway_id="gw")
    with caplog.at_level("CRITICAL"):
        upstream = await svc.retrieve(ctx("clinician"), classify("GET", f"/studies/{STUDY}"))
    assert upstream.status_code == 200
    assert "AUDIT EVENT NOT RECORDED" in caplog.text
    await upstream.aclose()
    outbox.close()
