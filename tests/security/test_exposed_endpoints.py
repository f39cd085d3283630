"""Issue 12 item 13: what answered without a token, what went unaudited, what defaulted to development.

* ``/metrics`` and the OpenAPI description (and any docs UI) answered anyone: now a bearer token with
  ``system:status:read`` (the admin role, policies/rbac.yaml); a denial is 403 and a 110113 alert.
  Only ``/healthz`` and ``/readyz`` stay open.
* A QIDO-RS answer from the archive that is too large or not a DICOM JSON array was refused with no
  audit event: now 502 in JSON and a failed 110112 (the archive here is a fake one that answers what
  each test needs).
* ``COMPLIANCE_ENVIRONMENT`` defaulted to ``development``, which turns the production safeguards off:
  now a configuration that does not say ``development`` is held to them, and placeholder secrets are
  refused with an error that names the setting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from compliance.config import PROJECT_ROOT
from tests.integration.conftest import _free_port, dump, stop_process

from .conftest import AuditIndex, Gateway, Stack, bearer
from .edges_support import FakeArchive, fake_archive, own_gateway

PROTECTED = ["/metrics", "/api/openapi.json"]
ELSEWHERE = ["/api/docs", "/api/redoc", "/docs", "/redoc", "/openapi.json", "/api/docs/oauth2-redirect"]


def _json_error(r: httpx.Response, status: int, error: str) -> None:
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    assert r.json()["error"] == error, r.text[:500]


@pytest.mark.parametrize("path", PROTECTED + ELSEWHERE)
def test_status_and_api_description_need_a_token(gateway: Gateway, path: str):
    r = httpx.get(gateway.url + path, timeout=30)
    _json_error(r, 401, "unauthenticated")
    assert r.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("path", PROTECTED)
def test_status_and_api_description_need_the_permission(gateway: Gateway, audit: AuditIndex, tokens, path: str):
    r = httpx.get(gateway.url + path, headers=bearer(tokens["alice"]), timeout=30)
    _json_error(r, 403, "forbidden")
    docs = audit.wait_for(1, **{"event.id": "110113", "user.name": "alice", "object.ids": f"api:{path}"})
    assert len(docs) >= 1, dump(docs)

    r = httpx.get(gateway.url + path, headers=bearer(tokens["ada"]), timeout=30)
    assert r.status_code == 200, r.text[:500]
    if path == "/metrics":
        assert "compliance_audit_outbox_recorded" in r.text
    else:
        assert "/dicom-web/{path}" in r.json()["paths"]


def test_health_stays_open(gateway: Gateway):
    for path in ("/healthz", "/readyz"):
        r = httpx.get(gateway.url + path, timeout=30)
        assert r.status_code == 200 and r.json()["status"] == "ok", r.text


# -- QIDO answers the gateway cannot pass on ---------------------------------------------------------------

QIDO_LIMIT = 64 * 1024
HUGE = json.dumps([{"00100020": {"vr": "LO", "Value": [f"P{i:06d}"]}} for i in range(6000)]).encode()
BROKEN = {
    "NOTJSON": ("application/dicom+json", b"<html>the archive is having a bad day</html>"),
    "NOTARRAY": ("application/dicom+json", b'{"00100020": {"vr": "LO", "Value": ["X"]}}'),
    "NOTOBJECTS": ("application/dicom+json", b'[1, "two", null]'),
    "HUGE": ("application/dicom+json", HUGE),
}


@dataclass
class Qido:
    gateway: Gateway
    audit: AuditIndex
    archive: FakeArchive


@pytest.fixture(scope="module")
def qido(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Qido]:
    assert len(HUGE) > QIDO_LIMIT
    tmp = tmp_path_factory.mktemp("edges-qido")
    answers = {**BROKEN, "FINE": ("application/dicom+json",
                                  b'[{"00100020": {"vr": "LO", "Value": ["FINE"]}}]')}
    with fake_archive(answers) as archive, own_gateway(
            stack, tmp, "edges-qido", COMPLIANCE_ARCHIVE_URL=archive.url, COMPLIANCE_ARCHIVE_ENCRYPTED="false",
            COMPLIANCE_QIDO_MAX_RESPONSE_BYTES=str(QIDO_LIMIT)) as (gw, audit):
        yield Qido(gw, audit, archive)


def test_a_qido_answer_the_gateway_cannot_pass_on_is_502_and_audited(qido: Qido, tokens):
    seen = 0
    for case in (*BROKEN, "FINE"):
        r = httpx.get(f"{qido.gateway.url}/dicom-web/studies", params={"PatientID": case},
                      headers=bearer(tokens["alice"]), timeout=30)
        seen += 1
        docs = qido.audit.wait_for(seen, **{"event.id": "110112", "user.name": "alice"})
        assert len(docs) == seen, (case, dump(docs))
        newest = docs[-1]
        if case == "FINE":
            assert r.status_code == 200, r.text[:500]
            assert (newest["event.outcome"], newest["patient.ids"]) == (0, ["FINE"]), dump(newest)
            continue
        _json_error(r, 502, "upstream_error")
        assert "FINE" not in r.text and "P000001" not in r.text
        assert newest["event.outcome"] != 0, (case, dump(newest))
        assert "archive" in (newest["event.outcome_description"] or ""), (case, dump(newest))


# -- production by default ----------------------------------------------------------------------------------

def _serve(tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``compliance serve`` with nothing but ``env`` configured (no stack directory, no gateway.env).
    Returns when it exits; one that is still serving after 30 s is stopped and reported."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COMPLIANCE_")}
    clean |= {"COMPLIANCE_STACK_DIR": str(tmp / "no-stack"),
              "COMPLIANCE_DATABASE_URL": f"sqlite:///{tmp / f'{uuid.uuid4().hex}.db'}", **env}
    proc = subprocess.Popen([sys.executable, "-m", "compliance.cli", "serve", "--port", str(_free_port())],
                            cwd=PROJECT_ROOT, env=clean, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if proc.poll() is None:
        stop_process(proc)
        out = proc.stdout.read() if proc.stdout else ""
        pytest.fail(f"the gateway started with {env}:\n{out[-3000:]}")
    out = proc.stdout.read() if proc.stdout else ""
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def test_an_unconfigured_gateway_is_held_to_production(tmp_path: Path):
    """Nothing says development: a plain-HTTP issuer and no archive password are refused."""
    done = _serve(tmp_path)
    assert done.returncode != 0
    assert "error:" in done.stdout and "COMPLIANCE_ENVIRONMENT" in done.stdout, done.stdout[-3000:]
    assert "Traceback" not in done.stdout, done.stdout[-3000:]


@pytest.mark.parametrize("name,value", [
    ("COMPLIANCE_ARCHIVE_PASSWORD", "changeme"),
    ("COMPLIANCE_ARCHIVE_PASSWORD", "${COMPLIANCE_ARCHIVE_PASSWORD}"),
    ("COMPLIANCE_ARCHIVE_PASSWORD", "s3cret"),
    ("COMPLIANCE_FRONT_SECRET", "changethis"),
    ("COMPLIANCE_OIDC_CLIENT_SECRET", "secret"),
])
def test_production_refuses_placeholder_secrets(tmp_path: Path, name: str, value: str):
    good = {"COMPLIANCE_ENVIRONMENT": "production", "COMPLIANCE_OIDC_ISSUER": "https://idp.example/realms/imaging",
            "COMPLIANCE_ARCHIVE_PASSWORD": "x7Vq2LrT9mKp4WzN8sYb3HcD",
            "COMPLIANCE_ELASTICSEARCH_URL": "https://es.example:9200",
            "COMPLIANCE_ELASTICSEARCH_API_KEY": "VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw=="}
    done = _serve(tmp_path, **{**good, name: value})
    assert done.returncode != 0
    assert "error:" in done.stdout and name in done.stdout, done.stdout[-3000:]
    if value != "secret":  # a word the message may use; the others are never echoed
        assert value not in done.stdout, "the refused secret is echoed"
