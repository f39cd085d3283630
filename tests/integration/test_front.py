"""The nginx front (``compliance front``, compliance/dicomweb/front.py) with retrieve delegation, on the real stack.

nginx listens where clients connect and passes every request to a gateway of our own started with
``COMPLIANCE_RETRIEVE_DELEGATION=true``; the gateway decides and audits a WADO-RS retrieve, then
answers ``X-Accel-Redirect`` so that nginx streams the instance from Orthanc itself. Covered here, as a
client and a privacy officer observe it:

* a STOW through the front, then a delegated retrieve returning the stored file byte for byte, audited
  once (110104, outcome 0) with the client's address as nginx saw it, even with a spoofed
  ``X-Forwarded-For``;
* what the archive receives from nginx (a second front pointed at a capture server): the gateway's
  Basic credentials and the client's ``Accept`` only, never the caller's token, cookie or other headers;
* an instance the archive does not hold: nginx hands the request back to the gateway, which answers a
  JSON 404 and records a second 110104 (outcome 4) naming the released event;
* refusals (no token, a researcher) answered in JSON through the front;
* the internal ``/_archive/`` location is unreachable from outside;
* ``compliance front --check``: the rendered configuration (mode 0600) and a refused ``--listen``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from compliance.config import PROJECT_ROOT
from compliance.db.migrate import scratch_schema
from compliance.demo import multipart_related

from .conftest import (
    AuditIndex,
    Gateway,
    Stack,
    _free_port,
    _reset_database,
    delete_study,
    drop_prefix,
    dump,
    peak_rss_mb,
    start_gateway,
    stop_gateway,
    stop_process,
    store_big_instance,
)
from .dicom_samples import Sample, parts_of_multipart, unique_instance

pytestmark = pytest.mark.integration

DICOM_JSON = "application/dicom+json"
WADO_ACCEPT = 'multipart/related; type="application/dicom"'
CAPTURED_BODY = b'--b1\r\nContent-Type: application/dicom\r\n\r\nnot really DICOM\r\n--b1--\r\n'


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def instance_path(sample: Sample, sop_instance_uid: str | None = None) -> str:
    return (f"/dicom-web/studies/{sample.study_uid}/series/{sample.series_uid}"
            f"/instances/{sop_instance_uid or sample.sop_instance_uid}")


# -- the front process ---------------------------------------------------------------------------------

@dataclass
class Front:
    url: str
    stack_dir: Path
    process: subprocess.Popen
    log_path: Path

    @property
    def error_log(self) -> str:
        path = self.stack_dir / "front" / "error.log"
        return path.read_text() if path.is_file() else "(no error.log)"


def front_env(gw: Gateway, stack_dir: Path, **extra: str) -> dict[str, str]:
    """The gateway's environment, with a stack directory of the front's own (it writes front/nginx.conf)."""
    return {**gw.env, "COMPLIANCE_STACK_DIR": str(stack_dir), **extra}


def start_front(gw: Gateway, tmp: Path, name: str, port: int, **extra_env: str) -> Front:
    stack_dir = tmp / name
    stack_dir.mkdir()
    log_path = tmp / f"{name}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    backend = gw.url.removeprefix("http://")
    proc = subprocess.Popen(
        [sys.executable, "-m", "compliance.cli", "front", "--listen", f"127.0.0.1:{port}", "--backend", backend],
        cwd=PROJECT_ROOT, env=front_env(gw, stack_dir, **extra_env), stdout=log, stderr=subprocess.STDOUT,
    )
    front = Front(f"http://127.0.0.1:{port}", stack_dir, proc, log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the front exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}\n"
                        f"{front.error_log[-4000:]}", pytrace=False)
        try:
            if httpx.get(f"{front.url}/healthz", timeout=1).status_code == 200:
                return front
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_front(front)
    pytest.fail(f"the front did not become healthy:\n{log_path.read_text()[-4000:]}\n{front.error_log[-4000:]}",
                pytrace=False)


def stop_front(front: Front) -> None:
    """SIGTERM to nginx's master (``compliance front`` exec'd it, in the foreground)."""
    stop_process(front.process)


@dataclass
class Deployment:
    gateway: Gateway
    front: Front
    audit: AuditIndex
    tmp: Path


@pytest.fixture(scope="module")
def deployment(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("front")
    prefix = f"test-front-{uuid.uuid4().hex[:10]}"
    with contextlib.ExitStack() as scope:
        # A database of its own: sharing the session gateway's would let that gateway's shipper send
        # these events to its own index (and a reset would pull the schema from under it).
        if os.environ.get("COMPLIANCE_TEST_DATABASE", "sqlite") == "postgres":
            assert stack.postgres_url, "COMPLIANCE_TEST_DATABASE=postgres needs the stack's PostgreSQL"
            db = scope.enter_context(scratch_schema(stack.postgres_url, "front"))
        else:
            db = f"sqlite:///{tmp / 'front.db'}"
            _reset_database(db)
        yield from _deploy(stack, tmp, db, prefix)


def _deploy(stack: Stack, tmp: Path, db: str, prefix: str) -> Iterator[Deployment]:
    front_port = _free_port()
    # The gateway keeps the real stack directory: the encrypted archive's key custodian lives there.
    gw = start_gateway(stack, tmp, database_url=db, index_prefix=prefix, extra_env={
        "COMPLIANCE_RETRIEVE_DELEGATION": "true",
        "COMPLIANCE_PUBLIC_ADDRESS": f"127.0.0.1:{front_port}",
    })
    try:
        front = start_front(gw, tmp, "front-stack", front_port)
        try:
            yield Deployment(gw, front, AuditIndex(stack.es_url, prefix), tmp)
        finally:
            stop_front(front)
    finally:
        stop_gateway(gw)
        drop_prefix(stack, prefix)


@pytest.fixture(scope="module")
def tokens(stack: Stack) -> dict[str, str]:
    return {u: stack.token(u) for u in ("tom", "rita", "alice", "rob")}


@dataclass
class Stored:
    sample: Sample
    stow: httpx.Response


@pytest.fixture(scope="module")
def stored(deployment: Deployment, tokens: dict[str, str]) -> Stored:
    """One instance of a patient of this module's own, stored by STOW-RS through the front as tom."""
    tag = uuid.uuid4().hex[:10]
    sample = unique_instance(patient_id=f"FRONT-{tag}", patient_name=f"Front^Test{tag}")
    body, ct = multipart_related([sample.data])
    r = httpx.post(f"{deployment.front.url}/dicom-web/studies", content=body, timeout=60,
                   headers={**bearer(tokens["tom"]), "Content-Type": ct, "Accept": DICOM_JSON})
    return Stored(sample, r)


# -- a fake archive recording what nginx asks ------------------------------------------------------------

@dataclass
class Capture:
    requests: list[dict] = field(default_factory=list)


def capture_server(capture: Capture) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            capture.requests.append({"line": self.requestline, "path": self.path,
                                     "headers": [(k.lower(), v) for k, v in self.headers.items()]})
            self.send_response(200)
            self.send_header("Content-Type", 'multipart/related; type="application/dicom"; boundary=b1')
            self.send_header("Content-Length", str(len(CAPTURED_BODY)))
            self.end_headers()
            self.wfile.write(CAPTURED_BODY)

        def log_message(self, *args: object) -> None:
            pass

    return ThreadingHTTPServer(("127.0.0.1", _free_port()), Handler)


# -- the tests ----------------------------------------------------------------------------------------------

def test_stow_and_delegated_retrieve_through_the_front(deployment: Deployment, tokens, stored: Stored):
    assert stored.stow.status_code == 200, stored.stow.text
    sample = stored.sample
    refs = stored.stow.json()["00081199"]["Value"]
    assert refs[0]["00081155"]["Value"] == [sample.sop_instance_uid]

    r = httpx.get(deployment.front.url + instance_path(sample),
                  headers={**bearer(tokens["rita"]), "Accept": WADO_ACCEPT}, timeout=60)
    assert r.status_code == 200, f"{r.text[:2000]}\n{deployment.front.error_log[-2000:]}"
    content_type = r.headers["content-type"]
    assert content_type.startswith("multipart/related"), content_type
    assert "boundary=" in content_type, content_type
    assert "x-accel-redirect" not in r.headers
    parts = parts_of_multipart(r.content, content_type)
    assert len(parts) == 1
    assert parts[0] == sample.data

    terms = {"event.id": "110104", "user.name": "rita", "study.uids": sample.study_uid}
    docs = deployment.audit.wait_for(1, **terms)
    assert len(docs) == 1, dump(docs)
    doc = docs[0]
    assert doc["patient.ids"] == [sample.patient_id]
    assert doc["study.uids"] == [sample.study_uid]
    assert doc["event.outcome"] == 0
    assert doc["source.address"] == "127.0.0.1"

    # nginx overwrites X-Forwarded-For: a client cannot choose the address the audit records
    spoofed = httpx.get(deployment.front.url + instance_path(sample), timeout=60,
                        headers={**bearer(tokens["rita"]), "Accept": WADO_ACCEPT, "X-Forwarded-For": "10.9.9.9"})
    assert spoofed.status_code == 200, spoofed.text[:2000]
    assert parts_of_multipart(spoofed.content, spoofed.headers["content-type"]) == [sample.data]
    docs = deployment.audit.wait_for(2, **terms)
    assert len(docs) == 2, dump(docs)
    assert [d["source.address"] for d in docs] == ["127.0.0.1", "127.0.0.1"]
    assert all(d["event.outcome"] == 0 for d in docs)


def test_a_forged_front_header_on_the_gateways_own_port_releases_nothing(deployment: Deployment, tokens,
                                                                         stored: Stored):
    """Only the front knows the shared secret: a client on the gateway's own port that claims to be the
    front gets the bytes relayed by the gateway (one delivered event each), never an empty X-Accel answer."""
    sample = stored.sample
    terms = {"event.id": "110104", "user.name": "rita", "study.uids": sample.study_uid}
    before = len(deployment.audit.wait_for(0, **terms))
    for forged in ("nginx", "x" * 48):
        r = httpx.get(deployment.gateway.url + instance_path(sample), timeout=60,
                      headers={**bearer(tokens["rita"]), "Accept": WADO_ACCEPT, "X-Compliance-Front": forged})
        assert r.status_code == 200, r.text[:2000]
        assert "x-accel-redirect" not in r.headers
        assert parts_of_multipart(r.content, r.headers["content-type"]) == [sample.data]
    docs = deployment.audit.wait_for(before + 2, **terms)
    assert len(docs) == before + 2, dump(docs)
    assert all(d["event.outcome"] == 0 for d in docs), dump(docs)

    # nor can it make its own refusal claim to follow somebody else's release
    forged_event = str(uuid.uuid4())
    r = httpx.get(deployment.gateway.url + instance_path(sample, generate_uid()), timeout=60,
                  headers={**bearer(tokens["rita"]), "Accept": WADO_ACCEPT, "X-Compliance-Front": "nginx",
                           "X-Compliance-Released-Event": forged_event})
    assert r.status_code == 404, r.text[:500]
    docs = deployment.audit.wait_for(before + 3, **terms)
    assert len(docs) == before + 3, dump(docs)
    assert not any(forged_event in (d.get("event.outcome_description") or "") for d in docs), dump(docs)


def test_the_archive_never_sees_the_callers_credentials(deployment: Deployment, tokens, stored: Stored,
                                                       stack: Stack):
    assert stored.stow.status_code == 200, stored.stow.text
    sample = stored.sample
    capture = Capture()
    server = capture_server(capture)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    archive_url = f"http://127.0.0.1:{server.server_address[1]}"
    front = start_front(deployment.gateway, deployment.tmp, "capture-front-stack", _free_port(),
                        COMPLIANCE_ARCHIVE_URL=archive_url)
    try:
        token = tokens["alice"]
        r = httpx.get(front.url + instance_path(sample), timeout=60, headers={
            **bearer(token), "Accept": WADO_ACCEPT, "Cookie": "session=secret", "X-Custom": "1"})
    finally:
        stop_front(front)
        server.shutdown()
        server.server_close()
    assert r.status_code == 200, f"{r.text[:2000]}\n{front.error_log[-2000:]}"
    assert r.content == CAPTURED_BODY

    assert len(capture.requests) == 1, capture.requests
    seen = capture.requests[0]
    assert seen["path"] == (f"/dicom-web/studies/{sample.study_uid}/series/{sample.series_uid}"
                            f"/instances/{sample.sop_instance_uid}")
    assert seen["line"].startswith("GET ")
    headers = dict(seen["headers"])
    user, password = stack.orthanc_auth
    assert headers.get("authorization") == "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    assert headers.get("accept") == WADO_ACCEPT
    assert "cookie" not in headers
    assert "x-custom" not in headers
    assert not [name for name in headers if name.startswith("x-compliance")], headers
    assert not [name for name in headers if name.startswith("x-forwarded")], headers
    assert token not in repr(seen) and "secret" not in repr(seen)
    # the release is audited as usual, against the real archive's index
    docs = deployment.audit.wait_for(1, **{"event.id": "110104", "user.name": "alice",
                                           "study.uids": sample.study_uid})
    assert len(docs) == 1, dump(docs)
    assert docs[0]["event.outcome"] == 0
    assert docs[0]["patient.ids"] == [sample.patient_id]


def test_an_instance_the_archive_lacks_is_handed_back_and_audited_twice(deployment: Deployment, tokens,
                                                                         stored: Stored):
    assert stored.stow.status_code == 200, stored.stow.text
    sample = stored.sample
    missing = generate_uid()
    r = httpx.get(deployment.front.url + instance_path(sample, missing),
                  headers={**bearer(tokens["tom"]), "Accept": WADO_ACCEPT}, timeout=60)
    assert r.status_code == 404, f"{r.text[:2000]}\n{deployment.front.error_log[-2000:]}"
    assert r.headers["content-type"].startswith("application/json"), r.headers
    assert "error" in r.json()

    docs = deployment.audit.wait_for(2, **{"event.id": "110104", "user.name": "tom",
                                           "study.uids": sample.study_uid})
    assert len(docs) == 2, dump(docs)
    released = [d for d in docs if d["event.outcome"] == 0]
    refused = [d for d in docs if d["event.outcome"] == 4]
    assert len(released) == 1 and len(refused) == 1, dump(docs)
    assert f"released by event {released[0]['event.uuid']}" in (refused[0]["event.outcome_description"] or "")
    assert refused[0]["patient.ids"] == [sample.patient_id]
    assert refused[0]["source.address"] == "127.0.0.1"


def test_refusals_through_the_front_are_json(deployment: Deployment, tokens, stored: Stored):
    url = deployment.front.url + instance_path(stored.sample)
    anonymous = httpx.get(url, headers={"Accept": WADO_ACCEPT}, timeout=30)
    assert anonymous.status_code == 401, anonymous.text
    assert "error" in anonymous.json()
    assert anonymous.headers["www-authenticate"].startswith("Bearer")

    researcher = httpx.get(url, headers={**bearer(tokens["rob"]), "Accept": WADO_ACCEPT}, timeout=30)
    assert researcher.status_code == 403, researcher.text
    assert "error" in researcher.json()

    # HEAD is not a DICOMweb transaction: refused before anything is fetched or audited as a transfer
    for base in (deployment.front.url, deployment.gateway.url):
        head = httpx.head(base + instance_path(stored.sample), headers={**bearer(tokens["rita"])}, timeout=30)
        assert head.status_code == 405, head.headers
        assert head.headers["allow"] == "GET, POST"


@pytest.mark.parametrize("user", [None, "rita"])
def test_the_internal_location_is_not_reachable_from_outside(deployment: Deployment, tokens, stored: Stored,
                                                            user: str | None):
    sample = stored.sample
    headers = {"Accept": WADO_ACCEPT, **(bearer(tokens[user]) if user else {})}
    for path in (f"/_archive/{uuid.uuid4()}/dicom-web/studies/{sample.study_uid}",
                 f"/_archive/{uuid.uuid4()}{instance_path(sample)}"):
        r = httpx.get(deployment.front.url + path, headers=headers, timeout=30)
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:2000])
        assert r.headers.get("content-type", "").startswith("application/json"), (r.headers, r.text[:500])
        assert "error" in r.json()
        assert b"DICM" not in r.content


def test_front_check_renders_a_private_configuration(deployment: Deployment, tmp_path: Path):
    backend = deployment.gateway.url.removeprefix("http://")
    stack_dir = tmp_path / "check-stack"
    env = front_env(deployment.gateway, stack_dir)
    ok = subprocess.run([sys.executable, "-m", "compliance.cli", "front", "--check",
                         "--listen", f"127.0.0.1:{_free_port()}", "--backend", backend],
                        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    config = stack_dir / "front" / "nginx.conf"
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o600
    assert "daemon off;" in config.read_text()

    bad = subprocess.run([sys.executable, "-m", "compliance.cli", "front", "--check",
                          "--listen", "nonsense", "--backend", backend],
                         cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0
    assert "error" in bad.stderr.lower() and "nonsense" in bad.stderr, bad.stderr

    # without the shared secret (or the archive password) the front refuses to start, and writes nothing
    for missing in ("COMPLIANCE_FRONT_SECRET", "COMPLIANCE_ARCHIVE_PASSWORD"):
        empty_dir = tmp_path / f"no-{missing.lower()}"
        refused = subprocess.run([sys.executable, "-m", "compliance.cli", "front", "--check",
                                  "--listen", f"127.0.0.1:{_free_port()}", "--backend", backend],
                                 cwd=PROJECT_ROOT, env=front_env(deployment.gateway, empty_dir, **{missing: ""}),
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2, refused.stderr
        assert missing in refused.stderr, refused.stderr
        assert not (empty_dir / "front" / "nginx.conf").exists()


def test_healthz_through_the_front_is_the_gateways(deployment: Deployment):
    r = httpx.get(f"{deployment.front.url}/healthz", timeout=10)
    assert r.status_code == 200
    assert json.loads(r.text) == httpx.get(f"{deployment.gateway.url}/healthz", timeout=10).json()


def _nginx_workers(front: Front) -> list[int]:
    children = Path(f"/proc/{front.process.pid}/task/{front.process.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def test_a_large_retrieve_through_the_front_is_never_held_nor_spooled(deployment: Deployment, stack: Stack,
                                                                       tokens):
    """A retrieve far larger than nginx's buffers, read slowly: nginx holds no more than its buffers,
    writes nothing to its temp directories (decrypted images never land on disk), and the gateway,
    which only decided and audited, does not grow either."""
    size_mb = int(os.environ.get("COMPLIANCE_TEST_FRONT_BIG_INSTANCE_MB", "120"))
    size, study, series, instance = store_big_instance(stack, size_mb, "FRONT-BIG", "Big^Front")
    temp_dirs = [deployment.front.stack_dir / "front" / d for d in ("proxy", "client_body")]
    workers = _nginx_workers(deployment.front)
    assert workers, "no nginx worker process"
    before = {pid: peak_rss_mb(pid) for pid in workers}
    gateway_before = peak_rss_mb(deployment.gateway.process.pid)
    received = 0
    spooled: list[str] = []
    url = f"{deployment.front.url}/dicom-web/studies/{study}/series/{series}/instances/{instance}"
    try:
        with httpx.stream("GET", url, timeout=300, headers={**bearer(tokens["rita"]), "Accept": WADO_ACCEPT}) as resp:
            assert resp.status_code == 200, resp.read()[:2000]
            for i, chunk in enumerate(resp.iter_raw()):
                received += len(chunk)
                if i == 1:
                    time.sleep(2)  # a slow client: the archive's answer piles up in front of it
                    spooled = [str(p) for d in temp_dirs for p in d.rglob("*") if p.is_file()]
        assert received > size
        assert spooled == [], spooled
        grown = {pid: peak_rss_mb(pid) - before[pid] for pid in workers}
        assert max(grown.values()) < 32, f"nginx peak RSS grew {grown} MiB for a {size >> 20} MiB retrieve"
        assert peak_rss_mb(deployment.gateway.process.pid) - gateway_before < 32
    finally:
        delete_study(stack, study)
