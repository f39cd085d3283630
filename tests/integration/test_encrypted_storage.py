"""The encrypted archive on the real stack: Orthanc with the storage plugin, behind the gateway.

Asserts on bytes on disk (Orthanc's storage directory), on what the gateway returns, and on the audit
documents in Elasticsearch.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from compliance.config import load_settings
from compliance.crypto.streaming import MAGIC

from .conftest import AuditIndex, Gateway, Stack, delete_study, dump
from .dicom_samples import Sample, parts_of_multipart, unique_instance
from .test_dicomweb_gateway import bearer, stow

pytestmark = pytest.mark.integration

INSTANCE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def storage_dir():
    return load_settings().stack_dir / "orthanc" / "storage-encrypted"


def attachment_path(stack: Stack, sample: Sample):
    auth = stack.orthanc_auth
    found = httpx.post(f"{stack.orthanc_url}/tools/lookup", content=sample.sop_instance_uid, auth=auth, timeout=10)
    instance = next(i["ID"] for i in found.json() if i["Type"] == "Instance")
    info = httpx.get(f"{stack.orthanc_url}/instances/{instance}/attachments/dicom/info", auth=auth, timeout=10).json()
    uuid = info["Uuid"]
    return storage_dir() / uuid[:2] / uuid[2:4] / uuid


def wado_instance(gw: Gateway, token: str, s: Sample) -> httpx.Response:
    return httpx.get(f"{gw.url}/dicom-web/studies/{s.study_uid}/series/{s.series_uid}/instances/{s.sop_instance_uid}",
                     headers={**bearer(token), "Accept": INSTANCE_ACCEPT}, timeout=60)


@pytest.fixture(scope="module")
def tokens(stack: Stack) -> dict[str, str]:
    return {u: stack.token(u) for u in ("alice", "tom", "ada")}


def test_the_stack_runs_the_encrypted_archive(gateway: Gateway):
    assert gateway.env.get("COMPLIANCE_ARCHIVE_ENCRYPTED") == "true", "deploy/local/up enables the plugin by default"


def test_stored_files_are_encrypted_and_wado_returns_the_original(gateway, stack, tokens):
    samples = [unique_instance("CT_small.dcm"), unique_instance("MR_small.dcm")]
    for s in samples:
        r = stow(gateway, tokens["tom"], s)
        assert r.status_code == 200, r.text
    files = [p for p in storage_dir().rglob("*") if p.is_file()]
    assert files, "Orthanc's storage directory holds the stored files"
    for s in samples:
        assert attachment_path(stack, s) in files
    needles = [n.encode() for s in samples for n in (s.patient_id, s.patient_name, s.patient_name.replace("^", " "))]
    for path in files:
        data = path.read_bytes()
        assert data[:4] == MAGIC, f"{path} is not in the encrypted format"
        assert data[128:132] != b"DICM", f"{path} is a plaintext DICOM file"
        for needle in needles:
            assert needle not in data, f"{path} contains {needle!r}"
    for s in samples:
        r = wado_instance(gateway, tokens["alice"], s)
        assert r.status_code == 200, r.text[:500]
        parts = parts_of_multipart(r.content, r.headers["content-type"])
        assert parts == [s.data], "WADO-RS returns the original instance byte for byte"


def test_one_file_per_instance_through_the_storage_shim(gateway, stack, tokens):
    """With the storage shim (built by deploy/local/up) Orthanc can read ranges, so it stores the
    instance alone, without its "dicom-until-pixel-data" copy; metadata is read by range."""
    shim = load_settings().stack_dir / "orthanc" / "libComplianceStorageShim.so"
    if not shim.is_file():
        pytest.skip("the storage shim is not built here (gcc, orthanc-dev or python3.11-dev missing)")
    s = unique_instance("CT_small.dcm")
    assert stow(gateway, tokens["tom"], s).status_code == 200
    auth = stack.orthanc_auth
    found = httpx.post(f"{stack.orthanc_url}/tools/lookup", content=s.sop_instance_uid, auth=auth, timeout=10)
    instance = next(i["ID"] for i in found.json() if i["Type"] == "Instance")
    attachments = httpx.get(f"{stack.orthanc_url}/instances/{instance}/attachments", auth=auth, timeout=10).json()
    assert attachments == ["dicom"], attachments
    r = httpx.get(f"{gateway.url}/dicom-web/studies/{s.study_uid}/metadata",
                  headers={**bearer(tokens["alice"]), "Accept": "application/dicom+json"}, timeout=30)
    assert r.status_code == 200, r.text[:300]
    assert r.json()[0]["00100020"]["Value"] == [s.patient_id]


def stored_then_corrupted(gw: Gateway, stack: Stack, token: str) -> tuple[Sample, Path]:
    """A new instance stored through the gateway, then one bit of its stored file flipped."""
    s = unique_instance()
    assert stow(gw, token, s).status_code == 200
    path = attachment_path(stack, s)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return s, path


def test_a_search_across_studies_failing_on_a_corrupted_file_is_an_integrity_alert(gateway, stack, tokens,
                                                                                  audit: AuditIndex):
    """A search not scoped to a study cannot verify a study: the custodian's journal of reads that
    failed authentication names the file, and the search answers 500 with a 110113 alert."""
    s, path = stored_then_corrupted(gateway, stack, tokens["tom"])
    try:
        r = httpx.get(f"{gateway.url}/dicom-web/instances",
                      params={"StudyInstanceUID": s.study_uid, "includefield": "all"},
                      headers={**bearer(tokens["alice"]), "Accept": "application/dicom+json"}, timeout=60)
        assert r.status_code == 500, r.text[:500]
        assert r.json()["error"] == "archive_integrity_failure"
        assert s.patient_id.encode() not in r.content
    finally:
        delete_study(stack, s.study_uid)
    deadline = time.monotonic() + 60
    alerts: list[dict] = []
    while not alerts and time.monotonic() < deadline:
        time.sleep(0.5)
        alerts = [a for a in audit.wait_for(1, within=5, event__id="110113", user__name="alice")
                  if path.name in (a.get("event.outcome_description") or "")]
    assert len(alerts) == 1, dump(alerts)
    assert alerts[0]["event.outcome"] == 8
    assert "did not authenticate while the archive answered a search" in alerts[0]["event.outcome_description"]


def test_a_corrupted_file_is_an_integrity_failure_never_returned(gateway, stack, tokens, audit: AuditIndex):
    s, _ = stored_then_corrupted(gateway, stack, tokens["tom"])
    try:
        r = wado_instance(gateway, tokens["alice"], s)
        assert r.status_code == 500, r.text[:500]
        assert r.json()["error"] == "archive_integrity_failure"
        assert s.data[132:400] not in r.content
        metadata = httpx.get(f"{gateway.url}/dicom-web/studies/{s.study_uid}/metadata",
                             headers={**bearer(tokens["alice"]), "Accept": "application/dicom+json"}, timeout=60)
        assert metadata.status_code == 500 and metadata.json()["error"] == "archive_integrity_failure"
        series = httpx.get(f"{gateway.url}/dicom-web/studies/{s.study_uid}/series", params={"includefield": "all"},
                           headers={**bearer(tokens["alice"]), "Accept": "application/dicom+json"}, timeout=60)
        # a study-scoped search reads the study's files too: the same answer and alert, not a bare 502
        assert series.status_code == 500 and series.json()["error"] == "archive_integrity_failure", series.text
    finally:
        # A corrupted file left in the archive would fail every later search that reads it.
        delete_study(stack, s.study_uid)
    alerts = audit.wait_for(3, event__id="110113", study__uids=s.study_uid)
    assert len(alerts) == 3, dump(alerts)
    assert all("integrity failure" in (a.get("event.outcome_description") or "") for a in alerts), dump(alerts)
    assert all(a["user.name"] == "alice" for a in alerts)
    (query,) = audit.wait_for(1, event__id="110112", study__uids=s.study_uid)
    assert query["event.outcome"] == 8 and query["event.outcome_description"] == "archive status 500: integrity"
