"""The foundation, end to end on the real stack: Keycloak tokens, RBAC, Orthanc, Elasticsearch audit.

Every assertion is on what a user observes: status codes and JSON bodies, the bytes retrieved, and the
audit documents in Elasticsearch.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import tempfile
from pathlib import Path

import httpx
import pydicom
import pytest
from lxml import etree

from compliance.audit.atna import validate_atna_xml
from compliance.config import PROJECT_ROOT, load_settings
from compliance.demo import multipart_related, synthetic_instance

from .conftest import AuditIndex, Gateway, Stack, dump
from .dicom_samples import Sample, parts_of_multipart, unique_instance

pytestmark = pytest.mark.integration

DICOM_JSON = "application/dicom+json"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def stow(gw: Gateway, token: str, *samples: Sample, study: str | None = None) -> httpx.Response:
    body, ct = multipart_related([s.data for s in samples])
    path = f"/dicom-web/studies/{study}" if study else "/dicom-web/studies"
    return httpx.post(gw.url + path, content=body, headers={**bearer(token), "Content-Type": ct,
                                                              "Accept": DICOM_JSON}, timeout=60)


def orthanc_has_study(stack: Stack, study_uid: str) -> bool:
    r = httpx.post(f"{stack.orthanc_url}/tools/lookup", content=study_uid, auth=stack.orthanc_auth, timeout=10)
    r.raise_for_status()
    return any(item.get("Type") == "Study" for item in r.json())


@pytest.fixture(scope="module")
def tokens(stack: Stack) -> dict[str, str]:
    return {u: stack.token(u) for u in ("alice", "rita", "tom", "rob", "priya", "ada")}


@pytest.fixture(scope="module")
def stored(gateway: Gateway, tokens: dict[str, str]) -> Sample:
    sample = unique_instance()
    r = stow(gateway, tokens["tom"], sample)
    assert r.status_code == 200, r.text
    return sample


def test_technologist_stores_and_the_import_is_audited(gateway, tokens, stack, audit: AuditIndex):
    sample = unique_instance("MR_small.dcm")
    r = stow(gateway, tokens["tom"], sample)
    assert r.status_code == 200, r.text
    body = r.json()
    refs = body["00081199"]["Value"]
    assert refs[0]["00081155"]["Value"] == [sample.sop_instance_uid]
    # the URLs the archive writes point at the gateway, never at the hidden archive
    assert ":8042" not in r.text  # the port, not four digits that a random 2.25 UID may hold
    assert orthanc_has_study(stack, sample.study_uid)
    docs = audit.wait_for(1, **{"event.id": "110107", "study.uids": sample.study_uid})
    assert len(docs) == 1, dump(docs)
    doc = docs[0]
    assert doc["user.name"] == "tom"
    assert doc["client.id"] == "compliance-cli"
    assert doc["patient.ids"] == [sample.patient_id]
    assert doc["patient.names"] == [sample.patient_name]
    assert doc["event.outcome"] == 0
    assert doc["source.address"] == "127.0.0.1"
    validate_atna_xml(doc["atna.xml"].encode())


def test_clinician_finds_the_study_by_qido(gateway, tokens, stored: Sample, audit: AuditIndex):
    r = httpx.get(f"{gateway.url}/dicom-web/studies", params={"PatientID": stored.patient_id},
                  headers={**bearer(tokens["alice"]), "Accept": DICOM_JSON}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(DICOM_JSON)
    studies = r.json()
    assert [s["0020000D"]["Value"][0] for s in studies] == [stored.study_uid]
    docs = audit.wait_for(1, **{"event.id": "110112", "user.name": "alice", "patient.ids": stored.patient_id})
    assert len(docs) == 1, dump(docs)
    assert docs[0]["study.uids"] == [stored.study_uid]
    assert docs[0]["patient.names"] == [stored.patient_name]
    xml = docs[0]["atna.xml"]
    validate_atna_xml(xml.encode())
    assert "ParticipantObjectQuery" in xml


def test_wado_returns_the_stored_instance_byte_for_byte(gateway, tokens, stored: Sample, audit: AuditIndex):
    url = (f"{gateway.url}/dicom-web/studies/{stored.study_uid}/series/{stored.series_uid}"
           f"/instances/{stored.sop_instance_uid}")
    r = httpx.get(url, headers={**bearer(tokens["rita"]),
                                "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
                  timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("multipart/related")
    parts = parts_of_multipart(r.content, r.headers["content-type"])
    assert len(parts) == 1
    assert parts[0] == stored.data
    docs = audit.wait_for(1, **{"event.id": "110104", "user.name": "rita", "study.uids": stored.study_uid})
    assert len(docs) == 1, dump(docs)
    assert docs[0]["patient.ids"] == [stored.patient_id]
    assert docs[0]["patient.names"] == [stored.patient_name]
    validate_atna_xml(docs[0]["atna.xml"].encode())


def test_metadata_is_an_instances_accessed_event(gateway, tokens, stored: Sample, audit: AuditIndex):
    r = httpx.get(f"{gateway.url}/dicom-web/studies/{stored.study_uid}/metadata",
                  headers={**bearer(tokens["alice"]), "Accept": DICOM_JSON}, timeout=30)
    assert r.status_code == 200, r.text
    meta = r.json()
    assert meta[0]["00080018"]["Value"] == [stored.sop_instance_uid]
    docs = audit.wait_for(1, **{"event.id": "110103", "user.name": "alice", "study.uids": stored.study_uid})
    assert len(docs) == 1, dump(docs)
    assert docs[0]["event.action"] == "R"
    assert docs[0]["patient.ids"] == [stored.patient_id]


def test_frames_and_rendered_through_the_gateway(gateway, tokens, stored: Sample):
    base = (f"{gateway.url}/dicom-web/studies/{stored.study_uid}/series/{stored.series_uid}"
            f"/instances/{stored.sop_instance_uid}")
    frames = httpx.get(f"{base}/frames/1", headers={**bearer(tokens["alice"]),
                       "Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}, timeout=30)
    assert frames.status_code == 200, frames.text
    ds = pydicom.dcmread(io.BytesIO(stored.data))
    assert parts_of_multipart(frames.content, frames.headers["content-type"])[0] == ds.PixelData
    rendered = httpx.get(f"{base}/rendered", headers={**bearer(tokens["alice"]), "Accept": "image/png"}, timeout=30)
    assert rendered.status_code == 200, rendered.text
    assert rendered.content.startswith(b"\x89PNG")


def test_researcher_is_refused_and_the_denial_is_a_security_alert(gateway, tokens, stored: Sample,
                                                                    audit: AuditIndex, stack: Stack):
    for path in (f"/dicom-web/studies?PatientID={stored.patient_id}", f"/dicom-web/studies/{stored.study_uid}"):
        r = httpx.get(gateway.url + path, headers=bearer(tokens["rob"]), timeout=30)
        assert r.status_code == 403, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert r.json()["error"] == "forbidden"
        assert stored.patient_name not in r.text
    r = stow(gateway, tokens["rob"], unique_instance())
    assert r.status_code == 403
    docs = audit.wait_for(3, **{"event.id": "110113", "user.name": "rob"})
    # rob's denials on this session's other routes (exports) are not this test's
    docs = [d for d in docs if not any(o.startswith("api:") for o in d["object.ids"])]
    assert len(docs) == 3, dump(docs)
    assert all(d["event.outcome"] == 4 for d in docs)
    assert all("110147" in d["event.type_codes"] for d in docs)
    for d in docs:
        validate_atna_xml(d["atna.xml"].encode())
    # nothing about the refused study was disclosed or queried: no 110112/110104 by rob
    assert audit.search(**{"event.id": "110112", "user.name": "rob"}) == []


def test_no_token_is_401_and_audited(gateway, audit: AuditIndex):
    r = httpx.get(f"{gateway.url}/dicom-web/studies", timeout=30)
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"] == "unauthenticated"
    bad = httpx.get(f"{gateway.url}/dicom-web/studies", headers=bearer("not.a.token"), timeout=30)
    assert bad.status_code == 401
    assert 'error="invalid_token"' in bad.headers["www-authenticate"]
    docs = audit.wait_for(2, **{"event.id": "110113", "participant.ids": "unauthenticated"})
    assert len(docs) >= 2, dump(docs)
    assert all(d["source.address"] == "127.0.0.1" for d in docs)


def test_token_for_another_audience_is_refused(gateway, stack: Stack):
    # An admin-console token of the realm: right issuer, right keys, wrong audience.
    r = httpx.post(f"{stack.keycloak_url}/realms/imaging/protocol/openid-connect/token",
                   data={"grant_type": "password", "client_id": "compliance-cli", "username": "alice",
                         "password": "demo-alice", "scope": "openid"}, timeout=30)
    id_token = r.json()["id_token"]
    resp = httpx.get(f"{gateway.url}/dicom-web/studies", headers=bearer(id_token), timeout=30)
    assert resp.status_code == 401


def test_malformed_multipart_is_400_stores_nothing_and_is_audited(gateway, tokens, stack, audit: AuditIndex):
    sample = unique_instance()
    body, ct = multipart_related([sample.data])
    truncated = body[: len(body) - 40]
    r = httpx.post(f"{gateway.url}/dicom-web/studies", content=truncated,
                   headers={**bearer(tokens["tom"]), "Content-Type": ct}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_request"
    assert not orthanc_has_study(stack, sample.study_uid)
    docs = audit.wait_for(1, **{"event.id": "110107", "user.name": "tom", "event.outcome": 8})
    assert any("malformed" in (d["event.outcome_description"] or "") or "truncated" in
               (d["event.outcome_description"] or "") for d in docs), dump(docs)


def test_non_dicom_part_is_refused_and_nothing_is_stored(gateway, tokens, stack):
    good = unique_instance()
    body, ct = multipart_related([good.data, b"MZ\x90\x00 this is not a DICOM file" * 20])
    r = httpx.post(f"{gateway.url}/dicom-web/studies", content=body,
                   headers={**bearer(tokens["tom"]), "Content-Type": ct}, timeout=30)
    assert r.status_code == 409, r.text
    assert r.json()["detail"]["failures"][0]["part"] == 1
    assert not orthanc_has_study(stack, good.study_uid)
    body, ct = multipart_related([b"hello"], media_type="text/plain")
    r = httpx.post(f"{gateway.url}/dicom-web/studies", content=body,
                   headers={**bearer(tokens["tom"]), "Content-Type": ct}, timeout=30)
    assert r.status_code == 415, r.text
    assert r.json()["error"] == "unsupported_media_type"


def test_body_over_the_limit_is_413(gateway, tokens, stack):
    sample = unique_instance()
    big = sample.data + b"\x00" * (9 * 1024 * 1024)  # the test gateway's limit is 8 MiB
    body, ct = multipart_related([big])
    r = httpx.post(f"{gateway.url}/dicom-web/studies", content=body,
                   headers={**bearer(tokens["tom"]), "Content-Type": ct}, timeout=60)
    assert r.status_code == 413, r.text
    assert r.json()["error"] == "payload_too_large"
    assert not orthanc_has_study(stack, sample.study_uid)


def test_chunked_body_crossing_the_limit_is_413_and_nothing_is_stored(gateway, tokens, stack, audit: AuditIndex):
    """No Content-Length to refuse up front: the stream is cut at the limit and the upload aborted."""
    big, study_uid, _, _ = synthetic_instance(frames=18)  # a valid 9 MiB instance (bytes appended to a file
    body, ct = multipart_related([big])                  # are refused as such before the limit)

    def chunks():
        for i in range(0, len(body), 256 * 1024):
            yield body[i : i + 256 * 1024]

    r = httpx.post(f"{gateway.url}/dicom-web/studies", content=chunks(),
                   headers={**bearer(tokens["tom"]), "Content-Type": ct}, timeout=60)
    assert r.status_code == 413, r.text
    assert r.json()["error"] == "payload_too_large"
    assert not orthanc_has_study(stack, study_uid)
    docs = audit.wait_for(1, **{"event.id": "110107", "user.name": "tom", "event.outcome": 8})
    assert any("larger than" in (d["event.outcome_description"] or "") for d in docs), dump(docs)


@contextlib.contextmanager
def archive_refuses_writes():
    """Make the real archive's storage area refuse every write: its directories immutable (chattr +i,
    which binds root too) for the duration. Orthanc's storage plugin then fails to create the file.
    If the run is killed before the flags are cleared, ``deploy/local/up`` clears them."""
    root = load_settings().stack_dir / "orthanc" / "storage-encrypted"
    probe = Path(tempfile.mkdtemp(dir=load_settings().stack_dir))
    try:
        if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not permitted here (needs CAP_LINUX_IMMUTABLE)")
        subprocess.run(["chattr", "-i", str(probe)], check=True)
    finally:
        probe.rmdir()
    dirs = [str(p) for p in (root, *root.rglob("*")) if p.is_dir()]
    subprocess.run(["chattr", "+i", *dirs], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *dirs], check=True)


def test_a_store_the_archive_failed_is_a_409_and_audited_as_failed(gateway, tokens, stack, audit: AuditIndex):
    """Orthanc answers 200, naming nothing, when its storage refuses the write: the gateway must not
    report, or audit, the instance as stored."""
    sample = unique_instance()
    with archive_refuses_writes():
        r = stow(gateway, tokens["tom"], sample)
    assert r.status_code == 409, r.text
    failed = r.json()["00081198"]["Value"]
    assert [(f["00081155"]["Value"], f["00081197"]["Value"]) for f in failed] == \
        [([sample.sop_instance_uid], [0x0110])]
    assert not orthanc_has_study(stack, sample.study_uid)
    docs = audit.wait_for(1, **{"event.id": "110107", "study.uids": sample.study_uid})
    assert len(docs) == 1, dump(docs)
    assert docs[0]["event.outcome"] == 8
    assert docs[0]["event.outcome_description"] == (
        f"the archive stored 0 of 1 instances; not stored: {sample.sop_instance_uid}: "
        "not acknowledged by the archive")
    assert docs[0]["patient.ids"] == [sample.patient_id]
    # the archive writes again once its storage does
    again = unique_instance()
    assert stow(gateway, tokens["tom"], again).status_code == 200
    assert orthanc_has_study(stack, again.study_uid)


def test_unknown_paths_are_not_proxied(gateway, tokens):
    for path in ("/dicom-web/tools/find", "/dicom-web/studies/abc", "/dicom-web/../system"):
        r = httpx.get(gateway.url + path, headers=bearer(tokens["alice"]), timeout=30)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["error"] == "not_found"


def test_unknown_study_is_404_json_and_audited_as_a_failure(gateway, tokens, audit: AuditIndex):
    r = httpx.get(f"{gateway.url}/dicom-web/studies/1.2.3.4.5.6.7.8.9/metadata",
                  headers={**bearer(tokens["alice"]), "Accept": DICOM_JSON}, timeout=30)
    assert r.status_code == 404
    assert r.json()["error"] == "not_found"
    docs = audit.wait_for(1, **{"event.id": "110103", "study.uids": "1.2.3.4.5.6.7.8.9"})
    assert len(docs) == 1 and docs[0]["event.outcome"] == 4, dump(docs)


def test_dicomweb_client_works_unchanged(gateway, tokens, stack):
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=f"{gateway.url}/dicom-web", headers=bearer(tokens["tom"]))
    sample = unique_instance()
    ds = pydicom.dcmread(io.BytesIO(sample.data))
    answer = client.store_instances([ds])
    assert [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence] == [sample.sop_instance_uid]
    assert "FailedSOPSequence" not in answer or not answer.FailedSOPSequence
    found = client.search_for_studies(search_filters={"PatientID": sample.patient_id})
    assert [f["0020000D"]["Value"][0] for f in found] == [sample.study_uid], \
        f"in the archive's index: {orthanc_has_study(stack, sample.study_uid)}"
    inst = client.retrieve_instance(sample.study_uid, sample.series_uid, sample.sop_instance_uid)
    assert inst.SOPInstanceUID == sample.sop_instance_uid
    assert inst.PatientID == sample.patient_id
    meta = client.retrieve_study_metadata(sample.study_uid)
    assert meta[0]["00100020"]["Value"] == [sample.patient_id]


SHARED_XSD = PROJECT_ROOT.parent / "shared" / "standards" / "dicom-audit-message-2024d.xsd"


def validate_against_shared_schema(xml: str) -> None:
    """The independent 2024d rendering of PS3.15 A.5.1, where the team's shared folder exists."""
    if not SHARED_XSD.is_file():
        return
    schema = etree.XMLSchema(etree.parse(str(SHARED_XSD)))
    doc = etree.fromstring(xml.encode())
    assert schema.validate(doc), schema.error_log


def test_each_allowed_request_yields_exactly_one_event(gateway, tokens, audit: AuditIndex):
    sample = unique_instance()
    assert stow(gateway, tokens["tom"], sample).status_code == 200
    h = {**bearer(tokens["alice"]), "Accept": DICOM_JSON}
    assert httpx.get(f"{gateway.url}/dicom-web/studies", params={"StudyInstanceUID": sample.study_uid},
                     headers=h, timeout=30).status_code == 200
    assert httpx.get(f"{gateway.url}/dicom-web/studies/{sample.study_uid}/series", headers=h,
                     timeout=30).status_code == 200
    assert httpx.get(f"{gateway.url}/dicom-web/studies/{sample.study_uid}",
                     headers={**bearer(tokens["alice"])}, timeout=30).status_code == 200
    expected = {("110107", "tom"): 1, ("110112", "alice"): 2, ("110104", "alice"): 1}
    docs = audit.wait_for(4, **{"study.uids": sample.study_uid})
    seen: dict[tuple[str, str], int] = {}
    for d in docs:
        seen[(d["event.id"], d["user.name"])] = seen.get((d["event.id"], d["user.name"]), 0) + 1
        assert d["patient.ids"] == [sample.patient_id]
        validate_atna_xml(d["atna.xml"].encode())
        validate_against_shared_schema(d["atna.xml"])
    assert seen == expected, dump(docs)
    assert len({d["_id"] for d in docs}) == len(docs)


def test_a_series_asked_for_under_another_study_is_never_served(gateway, tokens):
    """The audit names the patient of the study in the URL; the archive must not serve another study's
    data under it (Orthanc checks the hierarchy; this test guards that assumption)."""
    a, b = unique_instance(), unique_instance()
    assert stow(gateway, tokens["tom"], a).status_code == 200
    assert stow(gateway, tokens["tom"], b).status_code == 200
    h = {**bearer(tokens["alice"]), "Accept": "*/*"}
    for path in (f"/studies/{a.study_uid}/series/{b.series_uid}",
                 f"/studies/{a.study_uid}/series/{b.series_uid}/instances/{b.sop_instance_uid}",
                 f"/studies/{a.study_uid}/series/{b.series_uid}/metadata",
                 f"/studies/{a.study_uid}/series/{b.series_uid}/instances/{b.sop_instance_uid}/frames/1"):
        r = httpx.get(f"{gateway.url}/dicom-web{path}", headers=h, timeout=30)
        assert r.status_code == 404, (path, r.status_code)
        assert b.patient_id not in r.text
    r = httpx.get(f"{gateway.url}/dicom-web/studies/{a.study_uid}/series/{b.series_uid}/instances",
                  headers={**bearer(tokens["alice"]), "Accept": DICOM_JSON}, timeout=30)
    assert b.sop_instance_uid not in r.text
