"""Research exports end to end on the real stack: Keycloak tokens, Orthanc, the gateway, Elasticsearch.

request (rob) -> self-approval refused -> approval (dana) -> the job (in-process worker) -> bundle
download (rob only) -> the bundle's contents -> the 110106 Export in Elasticsearch with the SOURCE
patient; then dual-control re-identification (dana asks, sam approves, dana reveals once); then the
CLI; then the Dramatiq backend with two worker processes on a Redis started here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import httpx
import pydicom
import pytest

from compliance.config import PROJECT_ROOT
from compliance.demo import multipart_related
from tests.integration.conftest import (
    AuditIndex,
    _free_port,
    _reset_database,
    drop_prefix,
    start_gateway,
    stop_gateway,
)
from tests.integration.dicom_samples import unique_instance

pytestmark = pytest.mark.integration

#: A project of the registry (policies/projects.yaml) whose members include rob (group /research), and the
#: protocol it is registered under: a request must name a registered project its requester belongs to.
PROJECT, PROTOCOL = "lung-ct", "IRB-2026-042"


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _store(gateway_url: str, stack, samples) -> None:  # type: ignore[no-untyped-def]
    body, ct = multipart_related([s.data for s in samples])
    resp = httpx.post(f"{gateway_url}/dicom-web/studies", content=body,
                      headers={**_auth(stack.token("tom")), "Content-Type": ct}, timeout=60)
    assert resp.status_code == 200, resp.text


def _wait_done(url: str, token_for, request_id: str, within: float = 180) -> dict:  # type: ignore[no-untyped-def]
    """Poll the status until the job ends (bounded); the caller asserts on the state."""
    deadline = time.monotonic() + within
    status: dict = {}
    while time.monotonic() < deadline:
        resp = httpx.get(f"{url}/api/v1/exports/{request_id}", headers=_auth(token_for()), timeout=30)
        assert resp.status_code == 200, resp.text
        status = resp.json()
        if status["state"] not in ("requested", "approved", "running"):
            return status
        time.sleep(0.5)
    return status


def _request(url: str, token: str, study_uid: str, project: str = PROJECT) -> dict:
    resp = httpx.post(f"{url}/api/v1/exports", headers=_auth(token), timeout=30, json={
        "project": project, "protocol": PROTOCOL, "purpose": "nodule detection research",
        "profile": "basic", "cohort": {"study_uids": [study_uid]}})
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_export_end_to_end(stack, gateway, audit: AuditIndex):  # type: ignore[no-untyped-def]
    ct = unique_instance("CT_small.dcm")
    mr = unique_instance("MR_small.dcm", patient_id=ct.patient_id, patient_name=ct.patient_name,
                         study_uid=ct.study_uid)
    _store(gateway.url, stack, [ct, mr])
    project = PROJECT
    rob = stack.token("rob")
    created = _request(gateway.url, rob, ct.study_uid, project)
    rid = created["id"]
    assert created["state"] == "requested" and created["requester"]["username"] == "rob"

    # The requester cannot approve (researchers hold no approve permission; the service would refuse too).
    resp = httpx.post(f"{gateway.url}/api/v1/exports/{rid}/approve", headers=_auth(rob), json={"comment": "mine"},
                      timeout=30)
    assert resp.status_code == 403, resp.text
    # A decision needs a comment.
    dana = stack.token("dana")
    resp = httpx.post(f"{gateway.url}/api/v1/exports/{rid}/approve", headers=_auth(dana), json={}, timeout=30)
    assert resp.status_code == 400
    assert httpx.get(f"{gateway.url}/api/v1/exports/{rid}", headers=_auth(dana), timeout=30).json()["state"] \
        == "requested"
    resp = httpx.post(f"{gateway.url}/api/v1/exports/{rid}/approve", headers=_auth(dana),
                      json={"comment": "IRB-2026-042 approved"}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["approver"]["username"] == "dana"
    # Deciding twice is a conflict.
    resp = httpx.post(f"{gateway.url}/api/v1/exports/{rid}/reject", headers=_auth(dana),
                      json={"comment": "changed my mind"}, timeout=30)
    assert resp.status_code == 409, resp.text

    status = _wait_done(gateway.url, lambda: stack.token("rob"), rid)
    assert status["state"] == "ready", status
    assert status["progress"]["total"] == 2 and status["progress"]["released"] == 2
    assert status["progress"]["percent"] == 100.0

    # Only the requester downloads.
    resp = httpx.get(f"{gateway.url}/api/v1/exports/{rid}/bundle", headers=_auth(stack.token("dana")), timeout=30)
    assert resp.status_code == 403
    resp = httpx.get(f"{gateway.url}/api/v1/exports/{rid}/bundle", headers=_auth(stack.token("rob")), timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/zip"
    assert hashlib.sha256(resp.content).hexdigest() == resp.headers["x-content-sha256"] == status["checksum_sha256"]

    zf = zipfile.ZipFile(io.BytesIO(resp.content))
    names = zf.namelist()
    dicoms = sorted(n for n in names if n.endswith(".dcm"))
    assert "manifest.json" in names and "deid-report.json" in names and len(dicoms) == 2
    manifest = json.loads(zf.read("manifest.json"))
    assert manifest["export_request"] == rid and manifest["purpose"] == "nodule detection research"
    assert {f["path"] for f in manifest["files"]} == set(dicoms)
    for f in manifest["files"]:
        assert hashlib.sha256(zf.read(f["path"])).hexdigest() == f["sha256"]
    report = json.loads(zf.read("deid-report.json"))
    assert [e["status"] for e in report["files"]] == ["released", "released"]
    identifiers = [ct.patient_id, ct.patient_name.split("^")[1], ct.study_uid, ct.series_uid, ct.sop_instance_uid,
                   mr.series_uid, mr.sop_instance_uid]
    pseudonym_ids = set()
    for name in names:
        data = zf.read(name)
        for ident in identifiers:
            assert ident.encode() not in data, (name, ident)
        if name.endswith(".dcm"):
            ds = pydicom.dcmread(io.BytesIO(data))
            assert ds.PatientIdentityRemoved == "YES"
            pseudonym_ids.add(str(ds.PatientID))
    assert len(pseudonym_ids) == 1  # one patient, one pseudonym across both files
    bundle_dir = Path(gateway.env.get("COMPLIANCE_EXPORTS_DIR") or PROJECT_ROOT / ".stack" / "exports")
    on_disk = (bundle_dir / f"{rid}.bundle").read_bytes()
    assert on_disk[:4] == b"CGSE" and ct.patient_id.encode() not in on_disk and b"PK\x03\x04" not in on_disk

    # The disclosure in Elasticsearch: 110106 with the recipient, purpose and the SOURCE patient.
    exports = audit.wait_for(1, event__id="110106", **{"patient.ids": ct.patient_id})
    assert len(exports) == 1, exports
    doc = exports[0]
    assert doc["recipient"] == "rob" and doc["user.name"] == "rob"
    assert ct.study_uid in doc["study.uids"]
    assert "nodule detection research" in json.dumps(doc)
    alerts = audit.wait_for(1, event__id="110113", **{"user.name": "rob"})
    assert any(rid in json.dumps(a) or "approve" in json.dumps(a) for a in alerts)
    steps = audit.wait_for(4, event__id="110109")
    assert len([s for s in steps if rid in json.dumps(s)]) >= 4

    # Dual-control re-identification.
    pseudonym = pseudonym_ids.pop()
    body = {"project": project, "kind": "patient_id", "pseudonym": pseudonym, "reason": "incidental finding"}
    resp = httpx.post(f"{gateway.url}/api/v1/exports/reidentifications", headers=_auth(stack.token("rob")),
                      json=body, timeout=30)
    assert resp.status_code == 403
    resp = httpx.post(f"{gateway.url}/api/v1/exports/reidentifications", headers=_auth(stack.token("dana")),
                      json=body, timeout=30)
    assert resp.status_code == 201, resp.text
    reid = resp.json()["id"]
    resp = httpx.post(f"{gateway.url}/api/v1/exports/reidentifications/{reid}/approve",
                      headers=_auth(stack.token("dana")), json={"comment": "me"}, timeout=30)
    assert resp.status_code == 403, resp.text
    resp = httpx.post(f"{gateway.url}/api/v1/exports/reidentifications/{reid}/reveal",
                      headers=_auth(stack.token("dana")), timeout=30)
    assert resp.status_code == 409
    resp = httpx.post(f"{gateway.url}/api/v1/exports/reidentifications/{reid}/approve",
                      headers=_auth(stack.token("sam")), json={"comment": "second steward agrees"}, timeout=30)
    assert resp.status_code == 200, resp.text
    resp = httpx.post(f"{gateway.url}/api/v1/exports/reidentifications/{reid}/reveal",
                      headers=_auth(stack.token("sam")), timeout=30)
    assert resp.status_code == 404
    resp = httpx.post(f"{gateway.url}/api/v1/exports/reidentifications/{reid}/reveal",
                      headers=_auth(stack.token("dana")), timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["original"] == ct.patient_id
    resp = httpx.post(f"{gateway.url}/api/v1/exports/reidentifications/{reid}/reveal",
                      headers=_auth(stack.token("dana")), timeout=30)
    assert resp.status_code == 409
    revealed = audit.wait_for(1, event__id="110110", **{"patient.ids": ct.patient_id})
    assert len(revealed) == 1 and revealed[0]["user.name"] == "dana"


def _cli(gateway_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compliance.cli", "exports", *args, "--gateway", gateway_url],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)


def test_export_cli(stack, gateway, tmp_path):  # type: ignore[no-untyped-def]
    sample = unique_instance("CT_small.dcm")
    _store(gateway.url, stack, [sample])
    out = _cli(gateway.url, "request", "--user", "rob", "--project", PROJECT, "--protocol", PROTOCOL,
               "--purpose", "method development", "--profile", "basic", "--study", sample.study_uid)
    assert out.returncode == 0, out.stderr
    rid = json.loads(out.stdout)["id"]
    out = _cli(gateway.url, "approve", rid, "--user", "rob", "--comment", "self")
    assert out.returncode == 1 and "403" in out.stderr
    out = _cli(gateway.url, "approve", rid, "--user", "dana", "--comment", "ok")
    assert out.returncode == 0, out.stderr
    out = _cli(gateway.url, "status", rid, "--user", "rob", "--wait", "--interval", "0.3")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout[out.stdout.index("{"):])["state"] == "ready"
    target = tmp_path / "bundle.zip"
    out = _cli(gateway.url, "download", rid, str(target), "--user", "rob")
    assert out.returncode == 0, out.stderr
    assert len([n for n in zipfile.ZipFile(target).namelist() if n.endswith(".dcm")]) == 1


@pytest.fixture
def redis_url(tmp_path):  # type: ignore[no-untyped-def]
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (deploy/local/up installs it)", pytrace=False)
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    import socket

    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            time.sleep(0.1)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=20)


def test_exports_on_dramatiq_workers(stack, gateway, redis_url, tmp_path):  # type: ignore[no-untyped-def]
    """The task-queue backend: the gateway enqueues on approval, two Dramatiq worker processes run the jobs.

    Its own SQLite database, so the session gateway's in-process worker cannot take these jobs.
    """
    db = f"sqlite:///{tmp_path / 'dramatiq.db'}"
    _reset_database(db)
    env = {"COMPLIANCE_EXPORTS_WORKER_BACKEND": "dramatiq", "COMPLIANCE_EXPORTS_REDIS_URL": redis_url,
           "COMPLIANCE_EXPORTS_DIR": str(tmp_path / "bundles")}
    prefix = f"test-audit-dq-{uuid.uuid4().hex[:8]}"
    gw = start_gateway(stack, tmp_path, database_url=db, index_prefix=prefix, extra_env=env)
    worker_env = {**gw.env, **env}
    log = open(tmp_path / "dramatiq.log", "wb")  # noqa: SIM115
    workers = subprocess.Popen([str(Path(sys.executable).with_name("dramatiq")), "compliance.worker",
                                "--processes", "2", "--threads", "1"], cwd=PROJECT_ROOT, env=worker_env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        samples = [unique_instance("CT_small.dcm") for _ in range(2)]
        _store(gw.url, stack, samples)
        ids = [_request(gw.url, stack.token("rob"), s.study_uid)["id"] for s in samples]
        dana = stack.token("dana")
        for rid in ids:
            resp = httpx.post(f"{gw.url}/api/v1/exports/{rid}/approve", headers=_auth(dana), json={"comment": "ok"},
                              timeout=30)
            assert resp.status_code == 200, resp.text
        finals = [_wait_done(gw.url, lambda: stack.token("rob"), rid) for rid in ids]
        worker_log = (tmp_path / "dramatiq.log").read_text()[-3000:]
        assert [f["state"] for f in finals] == ["ready", "ready"], (finals, worker_log)
        # The jobs ran in the Dramatiq worker processes, not in the gateway.
        from sqlalchemy import create_engine, text

        with create_engine(db).connect() as conn:
            ran_by = [r[0] for r in conn.execute(text("SELECT worker FROM export_request"))]
        gateway_pid = str(gw.process.pid)
        assert all(w and w.split(":")[1] != gateway_pid for w in ran_by), ran_by
        resp = httpx.get(f"{gw.url}/api/v1/exports/{ids[0]}/bundle", headers=_auth(stack.token("rob")), timeout=60)
        assert resp.status_code == 200 and zipfile.ZipFile(io.BytesIO(resp.content)).namelist()
    finally:
        os.killpg(workers.pid, signal.SIGTERM)
        try:
            workers.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(workers.pid, signal.SIGKILL)
        log.close()
        stop_gateway(gw)
        drop_prefix(stack, prefix)


# --------------------------------------------------------------------------- push to a research archive

ARCHIVE_USER = "compliance-stack"  # deploy/local/up runs Orthanc as this user when started as root


@pytest.fixture
def research_archive():  # type: ignore[no-untyped-def]
    """A second Orthanc of our own (Debian's binary, the stack's template, DICOMweb plugin): the research
    archive. Orthanc 1.10 cannot bind an address: like the stack's, it refuses non-loopback clients
    (RemoteAccessAllowed false) and requires its own credentials."""
    import secrets
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="research-archive-"))
    os.chmod(base, 0o755)  # noqa: S103 - the archive's user must traverse it
    cfg = json.loads((PROJECT_ROOT / "deploy/orthanc/orthanc.json").read_text())
    port = _free_port()
    password = secrets.token_hex(16)
    for d in ("storage", "index", "tmp"):
        (base / d).mkdir()
    cfg.update(Name="research-archive", HttpPort=port, RemoteAccessAllowed=False, AuthenticationEnabled=True,
               RegisteredUsers={"exporter": password}, StorageDirectory=str(base / "storage"),
               IndexDirectory=str(base / "index"), TemporaryDirectory=str(base / "tmp"))
    (base / "orthanc.json").write_text(json.dumps(cfg))
    run_as: list[str] = []
    if os.geteuid() == 0:
        run_as = ["setpriv", f"--reuid={ARCHIVE_USER}", f"--regid={ARCHIVE_USER}", "--init-groups"]
        for p in [base, *base.rglob("*")]:
            shutil.chown(p, ARCHIVE_USER, ARCHIVE_USER)
    log = open(base / "orthanc.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([*run_as, "/usr/sbin/Orthanc", str(base / "orthanc.json")], stdout=log,
                            stderr=subprocess.STDOUT, env={"PATH": "/usr/bin:/bin", "HOME": str(base)})
    url = f"http://127.0.0.1:{port}"
    auth = ("exporter", password)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the research archive did not start:\n{(base / 'orthanc.log').read_text()[-3000:]}",
                            pytrace=False)
            try:
                if httpx.get(f"{url}/system", auth=auth, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert httpx.get(f"{url}/system", timeout=5).status_code == 401  # not open to anonymous clients
        yield type("ResearchArchive", (), dict(url=url, dicomweb=f"{url}/dicom-web", auth=auth, password=password,
                                               process=proc))
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def own_database(stack, tmp_path):  # type: ignore[no-untyped-def]
    """A database of this test's own (so the session gateway's worker cannot take its jobs): a SQLite file,
    or a fresh schema on the stack's PostgreSQL when COMPLIANCE_TEST_DATABASE=postgres."""
    if os.environ.get("COMPLIANCE_TEST_DATABASE", "sqlite") != "postgres":
        url = f"sqlite:///{tmp_path / 'push.db'}"
        _reset_database(url)
        yield url
        return
    from compliance.db.migrate import scratch_schema

    with scratch_schema(stack.postgres_url, "push") as url:
        yield url


def test_export_pushed_to_a_research_archive(stack, research_archive, own_database, tmp_path):  # type: ignore[no-untyped-def]
    """request (rob) naming a configured research archive -> approval (dana) -> de-identification, leak gate,
    STOW-RS into a second Orthanc -> QIDO/WADO there: only pseudonymised data -> 110106 naming the archive."""
    destinations = tmp_path / "destinations.yaml"
    destinations.write_text(
        "destinations:\n"
        "  research-archive:\n"
        "    kind: dicomweb\n"
        "    description: research archive of the integration test\n"
        f"    url: {research_archive.dicomweb}\n"
        "    auth: basic\n"
        "    username: exporter\n"
        "    password_env: COMPLIANCE_TEST_RESEARCH_ARCHIVE_PASSWORD\n"
        f"    projects: [{PROJECT}]\n")
    prefix = f"test-audit-push-{uuid.uuid4().hex[:8]}"
    gw = start_gateway(stack, tmp_path, database_url=own_database, index_prefix=prefix, extra_env={
        "COMPLIANCE_EXPORTS_DESTINATIONS_FILE": str(destinations),
        "COMPLIANCE_TEST_RESEARCH_ARCHIVE_PASSWORD": research_archive.password,
        "COMPLIANCE_EXPORTS_DIR": str(tmp_path / "bundles"),
        "COMPLIANCE_EXPORTS_STOW_BATCH_INSTANCES": "1"})
    audit = AuditIndex(stack.es_url, prefix)
    try:
        ct = unique_instance("CT_small.dcm")
        mr = unique_instance("MR_small.dcm", patient_id=ct.patient_id, patient_name=ct.patient_name,
                             study_uid=ct.study_uid)
        _store(gw.url, stack, [ct, mr])
        rob = stack.token("rob")

        # The allow-list, as researchers see it: names and URLs, never a credential.
        resp = httpx.get(f"{gw.url}/api/v1/exports/destinations", headers=_auth(rob), timeout=30)
        assert resp.status_code == 200, resp.text
        listed = {d["name"]: d for d in resp.json()["items"]}
        assert set(listed) == {"bundle", "research-archive"}
        assert listed["research-archive"]["url"] == research_archive.dicomweb
        assert listed["research-archive"]["projects"] == [PROJECT]
        assert research_archive.password not in resp.text and "PASSWORD" not in resp.text

        # A URL is never a destination; nor is a name that is not on the list. Nothing is created.
        base = {"project": PROJECT, "protocol": PROTOCOL, "purpose": "external validation",
                "profile": "basic", "cohort": {"study_uids": [ct.study_uid]}}
        for bad in ({"kind": "dicomweb", "name": "research-archive", "url": "http://203.0.113.9/dicom-web"},
                    {"kind": "dicomweb", "url": research_archive.dicomweb},
                    {"kind": "dicomweb", "name": "elsewhere"},
                    research_archive.dicomweb):
            resp = httpx.post(f"{gw.url}/api/v1/exports", headers=_auth(rob), json={**base, "destination": bad},
                              timeout=30)
            assert resp.status_code == 400, (bad, resp.text)
        assert httpx.get(f"{gw.url}/api/v1/exports", headers=_auth(rob), timeout=30).json()["items"] == []

        resp = httpx.post(f"{gw.url}/api/v1/exports", headers=_auth(rob), timeout=30,
                          json={**base, "destination": {"kind": "dicomweb", "name": "research-archive"}})
        assert resp.status_code == 201, resp.text
        rid = resp.json()["id"]
        assert resp.json()["destination"] == {"kind": "dicomweb", "name": "research-archive"}
        resp = httpx.post(f"{gw.url}/api/v1/exports/{rid}/approve", headers=_auth(stack.token("dana")),
                          json={"comment": "IRB-2026-077 approved for the research archive"}, timeout=30)
        assert resp.status_code == 200, resp.text

        status = _wait_done(gw.url, lambda: stack.token("rob"), rid)
        assert status["state"] == "ready", (status, gw.log_path.read_text()[-3000:])
        delivery = status["delivery"]
        assert (delivery["released"], delivery["stored"], delivery["failed"], delivery["unconfirmed"]) == (2, 2, 0, 0)
        assert [f["status"] for f in delivery["files"]] == ["stored", "stored"]
        pushed_uids = {f["sop_instance_uid"] for f in delivery["files"]}
        assert all(u.startswith("2.25.") for u in pushed_uids)
        # There is no bundle to download: the data went to the archive.
        resp = httpx.get(f"{gw.url}/api/v1/exports/{rid}/bundle", headers=_auth(stack.token("rob")), timeout=30)
        assert resp.status_code == 409, resp.text

        # What the research archive holds (QIDO-RS, WADO-RS with its own credentials): the two instances,
        # pseudonymised, and not one identifying value of the source.
        resp = httpx.get(f"{research_archive.dicomweb}/instances", auth=research_archive.auth, timeout=30,
                         headers={"Accept": "application/dicom+json"})
        assert resp.status_code == 200, resp.text
        found = resp.json()
        assert {i["00080018"]["Value"][0] for i in found} == pushed_uids
        source_values = [ct.patient_id, ct.patient_name, ct.patient_name.split("^")[1], ct.study_uid,
                         ct.series_uid, ct.sop_instance_uid, mr.series_uid, mr.sop_instance_uid]
        patient_ids = set()
        for item in found:
            study = item["0020000D"]["Value"][0]
            series = item["0020000E"]["Value"][0]
            sop = item["00080018"]["Value"][0]
            resp = httpx.get(f"{research_archive.dicomweb}/studies/{study}/series/{series}/instances/{sop}",
                             auth=research_archive.auth, timeout=30,
                             headers={"Accept": 'multipart/related; type="application/dicom"'})
            assert resp.status_code == 200, resp.text
            for value in source_values:
                assert value.encode() not in resp.content, value
            from compliance.dicomweb.reader import multipart_parts

            (data,) = multipart_parts(resp.headers["content-type"], resp.content)
            ds = pydicom.dcmread(io.BytesIO(data))
            assert ds.PatientIdentityRemoved == "YES"
            assert ds.StudyInstanceUID.startswith("2.25.") and ds.StudyInstanceUID != ct.study_uid
            assert str(ds.PatientName) != ct.patient_name and str(ds.PatientID) != ct.patient_id
            patient_ids.add(str(ds.PatientID))
        assert len(patient_ids) == 1  # one patient, one pseudonym

        # The disclosure, in Elasticsearch: one 110106 per STOW batch (batches of one here), recorded
        # before the batch left, naming the research archive as the recipient.
        exports = audit.wait_for(2, event__id="110106", **{"patient.ids": ct.patient_id})
        assert len(exports) == 2, exports
        for doc in exports:
            assert doc["recipient"] == "research-archive" and doc["user.name"] == "rob"
            assert f"{research_archive.dicomweb}/studies" in doc["participant.ids"]
            assert doc["event.outcome"] == 0 and "external validation" in json.dumps(doc)
        assert ct.study_uid in {uid for doc in exports for uid in doc["study.uids"]}

        # The archive goes away: the next push fails, each file says why, and nothing is disclosed.
        research_archive.process.terminate()
        research_archive.process.wait(timeout=30)
        other = unique_instance("CT_small.dcm")
        _store(gw.url, stack, [other])
        resp = httpx.post(f"{gw.url}/api/v1/exports", headers=_auth(stack.token("rob")), timeout=30,
                          json={**base, "cohort": {"study_uids": [other.study_uid]},
                                "destination": {"kind": "dicomweb", "name": "research-archive"}})
        assert resp.status_code == 201, resp.text
        rid2 = resp.json()["id"]
        assert httpx.post(f"{gw.url}/api/v1/exports/{rid2}/approve", headers=_auth(stack.token("dana")),
                          json={"comment": "ok"}, timeout=30).status_code == 200
        status = _wait_done(gw.url, lambda: stack.token("rob"), rid2)
        assert status["state"] == "failed", status
        assert [(f["status"], f["reason"]) for f in status["delivery"]["files"]] == \
            [("failed", "destination unreachable (ConnectError)")]
        assert "no instance was stored at research-archive" in status["error"]
        # The attempt was audited before anything was sent (a job killed mid-push leaves no unaudited
        # disclosure), then its failure: nothing of it was stored.
        attempt = audit.wait_for(2, event__id="110106", **{"patient.ids": other.patient_id})
        assert [d["event.outcome"] for d in attempt] == [0, 8], attempt
        assert "1 instances sent" in attempt[0]["event.outcome_description"]
        assert "1 of 1 instances sent were not confirmed stored" in attempt[1]["event.outcome_description"]
        assert all(d["recipient"] == "research-archive" for d in attempt)
    finally:
        stop_gateway(gw)
        drop_prefix(stack, prefix)


# --------------------------------------------------------------------------- recovery: queue, leases, partial pushes

def _rows(database_url: str, sql: str, **params: object) -> list[tuple]:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


def _approve(url: str, stack, rid: str) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(f"{url}/api/v1/exports/{rid}/approve", headers=_auth(stack.token("dana")),
                      json={"comment": "IRB approved"}, timeout=30)


def _start_dramatiq(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, object]:
    log = open(log_path, "wb")  # noqa: SIM115 - closed by _stop_dramatiq
    proc = subprocess.Popen([str(Path(sys.executable).with_name("dramatiq")), "compliance.worker",
                             "--processes", "1", "--threads", "1"], cwd=PROJECT_ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _stop_dramatiq(proc: subprocess.Popen, log) -> None:  # type: ignore[no-untyped-def]
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    log.close()


def test_an_approval_survives_an_unreachable_broker(stack, redis_url, own_database, tmp_path):  # type: ignore[no-untyped-def]
    """Redis is unreachable when the steward approves: the approval stands (200, "pending"), nothing is
    half-done, and a Dramatiq worker started once a broker is reachable dispatches and runs the job, once."""
    unreachable = f"redis://127.0.0.1:{_free_port()}/0"  # nothing listens there
    bundles = tmp_path / "bundles"
    env = {"COMPLIANCE_EXPORTS_WORKER_BACKEND": "dramatiq", "COMPLIANCE_EXPORTS_REDIS_URL": unreachable,
           "COMPLIANCE_EXPORTS_DIR": str(bundles)}
    prefix = f"test-audit-dqdown-{uuid.uuid4().hex[:8]}"
    gw = start_gateway(stack, tmp_path, database_url=own_database, index_prefix=prefix, extra_env=env)
    workers = None
    try:
        sample = unique_instance("CT_small.dcm")
        _store(gw.url, stack, [sample])
        rid = _request(gw.url, stack.token("rob"), sample.study_uid)["id"]
        resp = _approve(gw.url, stack, rid)
        assert resp.status_code == 200, resp.text
        answer = resp.json()
        assert answer["state"] == "approved" and answer["approver"]["username"] == "dana"
        assert answer["dispatch"]["status"] == "pending", answer
        assert "dispatched automatically" in answer["dispatch"]["detail"]
        assert "ConnectionError" in answer["dispatch"]["detail"]
        # the database holds the approval, not yet handed to any queue
        assert _rows(own_database, "SELECT state, dispatched_at, attempts FROM export_request WHERE id = :id",
                     id=rid) == [("approved", None, 0)]
        resp = httpx.get(f"{gw.url}/api/v1/exports/{rid}", headers=_auth(stack.token("dana")), timeout=30)
        assert resp.status_code == 200 and resp.json()["state"] == "approved"
        # deciding again is still a conflict: the approval is done, whatever the queue did
        resp = httpx.post(f"{gw.url}/api/v1/exports/{rid}/reject", headers=_auth(stack.token("sam")),
                          json={"comment": "too late"}, timeout=30)
        assert resp.status_code == 409, resp.text

        # A worker on a reachable broker: its sweep (at boot) dispatches what the gateway could not.
        workers = _start_dramatiq({**gw.env, **env, "COMPLIANCE_EXPORTS_REDIS_URL": redis_url,
                                   "COMPLIANCE_EXPORTS_DISPATCH_GRACE_SECONDS": "0",
                                   "COMPLIANCE_EXPORTS_SWEEP_INTERVAL_SECONDS": "1"}, tmp_path / "dramatiq.log")
        status = _wait_done(gw.url, lambda: stack.token("rob"), rid)
        worker_log = (tmp_path / "dramatiq.log").read_text()[-3000:]
        assert status["state"] == "ready", (status, worker_log)
        assert status["attempts"] == 1 and status["dispatched_at"] is not None
        ((worker,),) = _rows(own_database, "SELECT worker FROM export_request WHERE id = :id", id=rid)
        assert worker.split(":")[1] != str(gw.process.pid)  # run by the Dramatiq worker
        assert sorted(p.name for p in bundles.iterdir()) == [f"{rid}.bundle"]
        resp = httpx.get(f"{gw.url}/api/v1/exports/{rid}/bundle", headers=_auth(stack.token("rob")), timeout=60)
        assert resp.status_code == 200, resp.text
        assert hashlib.sha256(resp.content).hexdigest() == status["checksum_sha256"]
        assert len([n for n in zipfile.ZipFile(io.BytesIO(resp.content)).namelist() if n.endswith(".dcm")]) == 1
    finally:
        if workers is not None:
            _stop_dramatiq(*workers)
        stop_gateway(gw)
        drop_prefix(stack, prefix)


def test_a_job_left_running_by_a_dead_worker_is_recovered_once(stack, own_database, tmp_path):  # type: ignore[no-untyped-def]
    """What a worker killed mid-job leaves: the request running under an expired lease, a partial bundle.
    A gateway's sweep requeues it, the re-run completes it with one bundle and no duplicated disclosure;
    a request interrupted as often as allowed fails, saying why."""
    from sqlalchemy import create_engine, update

    from compliance.exports.models import ExportRequest

    bundles = tmp_path / "bundles"
    prefix = f"test-audit-lease-{uuid.uuid4().hex[:8]}"
    env = {"COMPLIANCE_EXPORTS_DIR": str(bundles), "COMPLIANCE_EXPORTS_WORKER_BACKEND": "none"}
    gw = start_gateway(stack, tmp_path, database_url=own_database, index_prefix=prefix, extra_env=env)
    audit = AuditIndex(stack.es_url, prefix)
    try:
        samples = [unique_instance("CT_small.dcm") for _ in range(2)]
        _store(gw.url, stack, samples)
        rob = stack.token("rob")
        rids = [_request(gw.url, rob, s.study_uid)["id"] for s in samples]
        for rid in rids:
            resp = _approve(gw.url, stack, rid)
            assert resp.status_code == 200, resp.text
            assert resp.json()["dispatch"]["status"] == "pending"  # this gateway runs no jobs
        stop_gateway(gw)

        # The state a worker killed mid-job leaves behind (its claim, a lease it no longer renews, its partial
        # bundle); the second request was interrupted for the third time, the last one allowed.
        from datetime import UTC, datetime, timedelta

        now = datetime.now(UTC)
        engine = create_engine(own_database)
        with engine.begin() as conn:
            for rid, attempts in zip(rids, (1, 3), strict=True):
                conn.execute(update(ExportRequest).where(ExportRequest.id == rid).values(
                    state="running", worker="dead-host:4242:1", started_at=now - timedelta(minutes=10),
                    attempts=attempts, lease_expires_at=now - timedelta(minutes=1)))
        engine.dispose()
        bundles.mkdir()
        (bundles / f".{rids[0]}.1.bundle.part").write_bytes(b"CGSE half a bundle")
        (bundles / f".{rids[1]}.3.bundle.part").write_bytes(b"CGSE half another bundle")

        gw = start_gateway(stack, tmp_path, database_url=own_database, index_prefix=prefix,
                           extra_env={**env, "COMPLIANCE_EXPORTS_WORKER_BACKEND": "inprocess"})
        status = _wait_done(gw.url, lambda: stack.token("rob"), rids[0])
        assert status["state"] == "ready", (status, gw.log_path.read_text()[-3000:])
        assert status["attempts"] == 2 and status["progress"]["released"] == 1
        failed = _wait_done(gw.url, lambda: stack.token("rob"), rids[1])
        assert failed["state"] == "failed" and failed["attempts"] == 3
        assert failed["error"].startswith("the export job was interrupted 3 times"), failed
        # exactly one bundle, the re-run's; the partials are gone
        assert sorted(p.name for p in bundles.iterdir()) == [f"{rids[0]}.2.bundle"]
        resp = httpx.get(f"{gw.url}/api/v1/exports/{rids[0]}/bundle", headers=_auth(stack.token("rob")), timeout=60)
        assert resp.status_code == 200, resp.text
        assert hashlib.sha256(resp.content).hexdigest() == status["checksum_sha256"]
        zf = zipfile.ZipFile(io.BytesIO(resp.content))
        assert len([n for n in zf.namelist() if n.endswith(".dcm")]) == 1
        assert json.loads(zf.read("manifest.json"))["export_request"] == rids[0]

        # The audit trail: the requeue and the final failure as order records, one disclosure (the download).
        exports = audit.wait_for(1, event__id="110106", **{"patient.ids": samples[0].patient_id})
        assert len(exports) == 1 and exports[0]["recipient"] == "rob", exports
        assert audit.search(event__id="110106", **{"patient.ids": samples[1].patient_id}) == []
        steps = audit.wait_for(1, event__id="110109", **{"event.outcome": "4"})
        requeued = [s for s in steps if rids[0] in json.dumps(s)]
        assert len(requeued) == 1, steps
        assert "stopped renewing its lease" in requeued[0]["event.outcome_description"]
        assert "queued again for attempt 2 of 3" in requeued[0]["event.outcome_description"]
        failures = [s for s in audit.wait_for(1, event__id="110109", **{"event.outcome": "8"})
                    if rids[1] in json.dumps(s)]
        assert len(failures) == 1 and "interrupted 3 times" in failures[0]["event.outcome_description"]
    finally:
        stop_gateway(gw)
        drop_prefix(stack, prefix)


class FakeResearchArchive:
    """A STOW-RS endpoint of the test's own: stores what it receives, and can hold one request so the test
    kills the job's worker while that batch is on its way."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from compliance.dicomweb.reader import multipart_parts

        self.received: list[list[str]] = []
        self.hold_request: int | None = None
        self.holding = threading.Event()
        self.release = threading.Event()
        archive = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                parts = multipart_parts(self.headers["Content-Type"], body)
                items = [(str(ds.SOPClassUID), str(ds.SOPInstanceUID))
                         for ds in (pydicom.dcmread(io.BytesIO(p)) for p in parts)]
                archive.received.append([uid for _, uid in items])
                if len(archive.received) == archive.hold_request:
                    archive.holding.set()
                    archive.release.wait(300)
                    self.send_response(503)
                    self.end_headers()
                    return
                answer = json.dumps({"00081199": {"vr": "SQ", "Value": [
                    {"00081150": {"vr": "UI", "Value": [cls]}, "00081155": {"vr": "UI", "Value": [uid]}}
                    for cls, uid in items]}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.dicomweb = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_push_killed_mid_way_keeps_its_delivery_and_map_and_resumes(stack, own_database, tmp_path):  # type: ignore[no-untyped-def]
    """The gateway running a push is killed (SIGKILL) while the second batch is on its way. The request keeps
    which file the destination stored and the pseudonym map of what left; after the lease runs out another
    gateway re-runs the job, which sends only the file not stored, and discloses nothing twice."""
    dest = FakeResearchArchive()
    dest.hold_request = 2
    destinations = tmp_path / "destinations.yaml"
    destinations.write_text("destinations:\n  lab-archive:\n    kind: dicomweb\n"
                            f"    url: {dest.dicomweb}\n    auth: none\n")
    prefix = f"test-audit-kill-{uuid.uuid4().hex[:8]}"
    env = {"COMPLIANCE_EXPORTS_DESTINATIONS_FILE": str(destinations), "COMPLIANCE_EXPORTS_DIR": str(tmp_path / "b"),
           "COMPLIANCE_EXPORTS_STOW_BATCH_INSTANCES": "1", "COMPLIANCE_EXPORTS_LEASE_SECONDS": "2",
           "COMPLIANCE_EXPORTS_SWEEP_INTERVAL_SECONDS": "1"}
    gw = start_gateway(stack, tmp_path, database_url=own_database, index_prefix=prefix, extra_env=env)
    audit = AuditIndex(stack.es_url, prefix)
    project = PROJECT
    try:
        first, second = unique_instance("CT_small.dcm"), unique_instance("MR_small.dcm")  # two patients
        _store(gw.url, stack, [first, second])
        resp = httpx.post(f"{gw.url}/api/v1/exports", headers=_auth(stack.token("rob")), timeout=30, json={
            "project": project, "protocol": PROTOCOL, "purpose": "external validation", "profile": "basic",
            "cohort": {"study_uids": [first.study_uid, second.study_uid]},
            "destination": {"kind": "dicomweb", "name": "lab-archive"}})
        assert resp.status_code == 201, resp.text
        rid = resp.json()["id"]
        assert _approve(gw.url, stack, rid).status_code == 200

        assert dest.holding.wait(120), gw.log_path.read_text()[-3000:]  # the second batch is on its way
        gw.process.send_signal(signal.SIGKILL)
        gw.process.wait(timeout=30)
        (stored_uid,), (in_flight_uid,) = dest.received
        dest.release.set()

        # What the dead job left: the first file stored, the second sending; the map of both (recorded
        # before each left), so what the destination holds can be re-identified under dual control.
        assert _rows(own_database, "SELECT state, attempts FROM export_request WHERE id = :id", id=rid) == \
            [("running", 1)]
        assert sorted(_rows(own_database, "SELECT sop_instance_uid, status, attempt FROM export_delivery_file "
                                          "WHERE request_id = :id", id=rid)) == \
            sorted([(stored_uid, "stored", 1), (in_flight_uid, "sending", 1)])
        mapped = set(_rows(own_database, "SELECT kind, pseudonym FROM export_pseudonym WHERE project = :p",
                           p=project))
        assert {("sop_uid", stored_uid), ("sop_uid", in_flight_uid)} <= mapped
        assert len([k for k, _ in mapped if k == "patient_id"]) == 2

        # What the request shows (a gateway that runs no jobs, so the job stays as the kill left it).
        gw = start_gateway(stack, tmp_path, database_url=own_database, index_prefix=prefix,
                           extra_env={**env, "COMPLIANCE_EXPORTS_WORKER_BACKEND": "none"})
        resp = httpx.get(f"{gw.url}/api/v1/exports/{rid}", headers=_auth(stack.token("rob")), timeout=30)
        assert resp.status_code == 200, resp.text
        shown = resp.json()
        assert shown["state"] == "running"
        assert [(f["sop_instance_uid"], f["status"]) for f in shown["delivery"]["files"]] == \
            [(stored_uid, "stored"), (in_flight_uid, "sending")]
        assert (shown["delivery"]["stored"], shown["delivery"]["sending"]) == (1, 1)
        stop_gateway(gw)

        # A gateway that runs jobs: its sweep requeues the request once the dead job's lease has run out.
        gw = start_gateway(stack, tmp_path, database_url=own_database, index_prefix=prefix, extra_env=env)
        status = _wait_done(gw.url, lambda: stack.token("rob"), rid)
        assert status["state"] == "ready", (status, gw.log_path.read_text()[-3000:])
        assert status["attempts"] == 2 and status["error"] is None
        delivery = status["delivery"]
        assert (delivery["released"], delivery["stored"], delivery["failed"], delivery["unconfirmed"]) == (2, 2, 0, 0)
        assert [(f["sop_instance_uid"], f["status"], f["attempt"]) for f in delivery["files"]] == \
            [(stored_uid, "stored", 1), (in_flight_uid, "stored", 2)]
        # the destination got the stored file once, the one in flight again
        assert dest.received == [[stored_uid], [in_flight_uid], [in_flight_uid]]

        # Disclosures: the file stored before the kill is disclosed once; the one in flight was sent twice,
        # and each sending was recorded before it left.
        firsts = audit.wait_for(1, event__id="110106", **{"patient.ids": first.patient_id})
        assert [(d["recipient"], d["event.outcome"]) for d in firsts] == [("lab-archive", 0)], firsts
        seconds = audit.wait_for(2, event__id="110106", **{"patient.ids": second.patient_id})
        assert [(d["recipient"], d["event.outcome"]) for d in seconds] == [("lab-archive", 0), ("lab-archive", 0)]
        assert all("1 instances sent" in d["event.outcome_description"] for d in firsts + seconds)
    finally:
        dest.close()
        stop_gateway(gw)
        drop_prefix(stack, prefix)
