"""Issue 12 item 8: the gateway works with a secured Elasticsearch, and never talks to one in clear.

The local stack's secured endpoint (``deploy/local/up es_proxy``: nginx in front of the plain 9200,
HTTPS under a CA generated at set-up, every request needing an API key, basic credentials or a client
certificate) stands for a cluster with its security module on. Each test starts a gateway configured
through ``COMPLIANCE_ELASTICSEARCH_*`` alone and looks at what a user or an operator would: the
document in Elasticsearch (read back through the plain port), the outbox, ``/readyz`` and
``/metrics``, the proxy's access log (which requests reached it, and how they authenticated), and the
CLI's output and exit status.
"""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from compliance.config import PROJECT_ROOT, load_settings
from tests.integration.conftest import (
    AuditIndex,
    Gateway,
    Stack,
    _free_port,
    _reset_database,
    drop_prefix,
    start_gateway,
    stop_gateway,
)
from tests.security.conftest import bearer

pytestmark = pytest.mark.integration

ACCESS_LOG = load_settings().stack_dir / "es-proxy" / "logs" / "access.log"


@pytest.fixture(scope="module")
def secure(stack: Stack) -> dict[str, str]:
    """The secured endpoint's URL, CA and credentials, as deploy/local/up wrote them into gateway.env."""
    values = {k.removeprefix("COMPLIANCE_ELASTICSEARCH_SECURE_"): v for k, v in stack.settings_env.items()
              if k.startswith("COMPLIANCE_ELASTICSEARCH_SECURE_")}
    if "URL" not in values:
        pytest.fail("the stack has no secured Elasticsearch endpoint: run deploy/local/up es_proxy", pytrace=False)
    r = httpx.get(f"{values['URL']}/_cluster/health", verify=ssl.create_default_context(cafile=values["CA_FILE"]),
                  timeout=10,
                  headers={"Authorization": f"ApiKey {values['API_KEY']}"})
    if r.status_code != 200:
        pytest.fail(f"the secured endpoint answers {r.status_code}: run deploy/local/up es_proxy", pytrace=False)
    return values


def es_env(url: str, **settings: str | Path) -> dict[str, str]:
    """COMPLIANCE_ELASTICSEARCH_URL and the given COMPLIANCE_ELASTICSEARCH_<NAME> settings; every other
    TLS/credential setting explicitly empty, so nothing leaks in from the environment."""
    env = {f"COMPLIANCE_ELASTICSEARCH_{name}": "" for name in
           ("CA_FILE", "API_KEY", "USERNAME", "PASSWORD", "CLIENT_CERT_FILE", "CLIENT_KEY_FILE")}
    env["COMPLIANCE_ELASTICSEARCH_URL"] = url
    env.update({f"COMPLIANCE_ELASTICSEARCH_{name.upper()}": str(value) for name, value in settings.items()})
    return env


def proxy_requests(prefix: str) -> list[str]:
    """The proxy's access-log lines for requests naming this index prefix (template, mappings)."""
    if not ACCESS_LOG.exists():
        return []
    return [line for line in ACCESS_LOG.read_text(errors="replace").splitlines() if f"/{prefix}" in line]


def outbox(db_url: str) -> tuple[int, int]:
    """(events recorded, events not yet shipped) in a gateway's outbox."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as c:
            total = c.execute(text("select count(*) from audit_outbox")).scalar_one()
            pending = c.execute(text("select count(*) from audit_outbox where shipped_at is null")).scalar_one()
    finally:
        engine.dispose()
    return int(total), int(pending)


def wait_for(predicate, within: float = 60.0):  # type: ignore[no-untyped-def]
    """Poll until ``predicate()`` is truthy (bounded); the caller asserts on the value."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    return predicate()


class Deployment:
    """A gateway of a test's own (fresh SQLite outbox, private index prefix) with given ES settings."""

    def __init__(self, stack: Stack, tmp_path: Path, name: str) -> None:
        self.stack, self.tmp = stack, tmp_path
        self.prefix = f"test-estls-{name}-{uuid.uuid4().hex[:8]}"
        self.db = f"sqlite:///{tmp_path / f'{name}.db'}"
        _reset_database(self.db)
        self.gateway: Gateway | None = None

    def start(self, es: dict[str, str]) -> Gateway:
        self.gateway = start_gateway(self.stack, self.tmp, database_url=self.db, index_prefix=self.prefix,
                                     extra_env=es)
        return self.gateway

    def stop(self) -> None:
        if self.gateway is not None:
            stop_gateway(self.gateway)
            self.gateway = None

    def query_as_alice(self, tag: str) -> None:
        assert self.gateway is not None
        r = httpx.get(f"{self.gateway.url}/dicom-web/studies", params={"PatientID": tag},
                      headers=bearer(self.stack.token("alice")), timeout=30)
        assert r.status_code in (200, 204), r.text

    def documents(self, **terms: str) -> list[dict]:
        """What Elasticsearch holds under this prefix now (refreshed first: shipped means visible)."""
        httpx.post(f"{self.stack.es_url}/{self.prefix}-*/_refresh", timeout=30,
                   params={"ignore_unavailable": "true", "allow_no_indices": "true"})
        return AuditIndex(self.stack.es_url, self.prefix).search(**terms)

    def cli(self, *args: str, es: dict[str, str]) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.stack.settings_env, "COMPLIANCE_DATABASE_URL": self.db,
               "COMPLIANCE_AUDIT_INDEX_PREFIX": self.prefix, **es}
        return subprocess.run([sys.executable, "-m", "compliance.cli", *args], cwd=PROJECT_ROOT, env=env,
                              capture_output=True, text=True, timeout=300)


@pytest.fixture
def deployment(stack: Stack, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    d = Deployment(stack, tmp_path, re.sub(r"[^a-z0-9]+", "-", request.node.name[5:25].lower()))
    try:
        yield d
    finally:
        d.stop()
        drop_prefix(stack, d.prefix)


def assert_ships_through_the_secured_endpoint(d: Deployment, auth: str) -> None:
    """An audited request's event reaches Elasticsearch, and it went through the proxy over TLS,
    authenticated as ``auth`` (the proxy's access log)."""
    d.query_as_alice(f"ESTLS-{auth}")
    index = AuditIndex(d.stack.es_url, d.prefix)
    shipped = index.wait_for(1, **{"event.id": "110112", "user.name": "alice"})
    assert len(shipped) == 1, f"the event never reached Elasticsearch; gateway log:\n{_log_tail(d)}"
    seen = proxy_requests(d.prefix)
    assert seen and all(f"auth={auth} tls=TLSv1." in line for line in seen), seen
    assert any('" 200 ' in line for line in seen) and not any('" 401 ' in line for line in seen), seen
    assert wait_for(lambda: outbox(d.db)[1] == 0), "events stay pending in the outbox"


def _log_tail(d: Deployment) -> str:
    assert d.gateway is not None
    return d.gateway.log_path.read_text(errors="replace")[-3000:]


# ------------------------------------------------------------------ the secured endpoint itself


def test_the_secured_endpoint_answers_nothing_without_valid_credentials_or_tls(secure):
    """What the tests below rely on: the stand-in for a secured cluster is closed by default."""
    tls = ssl.create_default_context(cafile=secure["CA_FILE"])
    health = f"{secure['URL']}/_cluster/health"
    for headers in ({}, {"Authorization": "ApiKey " + base64.b64encode(b"compliance-gateway:guess").decode()},
                    {"Authorization": "ApiKey " + secure["API_KEY"].lower()}):
        r = httpx.get(health, headers=headers, verify=tls, timeout=10)
        assert r.status_code == 401 and "cluster_name" not in r.text, (headers, r.text)
    assert httpx.get(health, auth=(secure["USERNAME"], "guess"), verify=tls, timeout=10).status_code == 401
    assert httpx.get(health, auth=(secure["USERNAME"], secure["PASSWORD"]), verify=tls, timeout=10).status_code == 200
    plain = httpx.get(health.replace("https://", "http://"), timeout=10)
    assert plain.status_code == 400 and "cluster_name" not in plain.text  # nginx: plain HTTP to an HTTPS port


# ------------------------------------------------------------------ the secured cluster works


def test_a_gateway_ships_its_audit_trail_to_a_secured_cluster_with_an_api_key(deployment, secure, stack):
    deployment.start(es_env(secure["URL"], ca_file=secure["CA_FILE"], api_key=secure["API_KEY"]))
    assert_ships_through_the_secured_endpoint(deployment, "api_key")
    # the privacy officer's reads go through the same (shared) client
    assert deployment.gateway is not None
    r = httpx.get(f"{deployment.gateway.url}/api/v1/audit/events", params={"user": "alice", "event_type": "110112"},
                  headers=bearer(stack.token("priya")), timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["total"] == 1


def test_a_gateway_ships_its_audit_trail_to_a_secured_cluster_with_basic_credentials(deployment, secure):
    deployment.start(es_env(secure["URL"], ca_file=secure["CA_FILE"], username=secure["USERNAME"],
                            password=secure["PASSWORD"]))
    assert_ships_through_the_secured_endpoint(deployment, "basic")


def test_a_gateway_ships_its_audit_trail_to_a_secured_cluster_with_a_client_certificate(deployment, secure):
    deployment.start(es_env(secure["URL"], ca_file=secure["CA_FILE"], client_cert_file=secure["CLIENT_CERT_FILE"],
                            client_key_file=secure["CLIENT_KEY_FILE"]))
    assert_ships_through_the_secured_endpoint(deployment, "client_cert")


# ------------------------------------------------------------------ and refuses what it must


def another_ca(tmp_path: Path) -> Path:
    """A CA that did not sign the cluster's certificate (an attacker's, or last year's)."""
    ca = tmp_path / "other-ca.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(tmp_path / "other-ca.key"), "-out", str(ca), "-days", "2",
                    "-subj", "/CN=not the cluster's CA"], check=True, capture_output=True)
    return ca


def assert_held_back(d: Deployment) -> None:
    """Nothing shipped, everything still in the outbox, the gateway alive and saying the repository is
    unreachable (/readyz and /metrics, as when Elasticsearch is down)."""
    assert d.gateway is not None
    d.query_as_alice("ESTLS-REFUSED")
    ready = wait_for(lambda: httpx.get(f"{d.gateway.url}/readyz", timeout=10).json()["audit_shipper"] == "degraded")
    assert ready, f"/readyz never reported the repository unreachable; gateway log:\n{_log_tail(d)}"
    r = httpx.get(f"{d.gateway.url}/metrics", headers=bearer(d.stack.token("ada")), timeout=10)
    assert r.status_code == 200, r.text
    assert "compliance_audit_shipper_up 0" in r.text
    recorded, pending = outbox(d.db)
    assert recorded >= 2 and pending == recorded  # the start event and the query: all held
    assert d.documents() == []
    assert d.gateway.process.poll() is None
    assert httpx.get(f"{d.gateway.url}/healthz", timeout=10).status_code == 200


def test_a_cluster_certificate_from_another_ca_is_refused_and_no_credential_is_sent(deployment, secure, tmp_path):
    deployment.start(es_env(secure["URL"], ca_file=another_ca(tmp_path), api_key=secure["API_KEY"]))
    assert_held_back(deployment)
    # the TLS handshake failed before any request: not one reached the proxy, so the API key never left
    assert proxy_requests(deployment.prefix) == []
    assert "CERTIFICATE_VERIFY_FAILED" in _log_tail(deployment)
    # with the right CA the same outbox drains: nothing was lost
    deployment.stop()
    deployment.start(es_env(secure["URL"], ca_file=secure["CA_FILE"], api_key=secure["API_KEY"]))
    assert wait_for(lambda: outbox(deployment.db)[1] == 0), _log_tail(deployment)
    assert len(deployment.documents(**{"event.id": "110112", "user.name": "alice"})) == 1


def test_a_wrong_api_key_is_refused_and_the_events_wait_in_the_outbox(deployment, secure):
    wrong = base64.b64encode(b"compliance-gateway:not-the-key").decode()
    deployment.start(es_env(secure["URL"], ca_file=secure["CA_FILE"], api_key=wrong))
    assert_held_back(deployment)
    refused = wait_for(lambda: proxy_requests(deployment.prefix))
    assert refused and all('" 401 ' in line for line in refused), refused
    assert "refused the gateway's credentials (401)" in _log_tail(deployment)


def test_wrong_basic_credentials_are_refused_too(deployment, secure):
    deployment.start(es_env(secure["URL"], ca_file=secure["CA_FILE"], username=secure["USERNAME"],
                            password="not-the-password"))
    assert_held_back(deployment)
    refused = wait_for(lambda: proxy_requests(deployment.prefix))
    assert refused and all('" 401 ' in line for line in refused), refused


@pytest.mark.parametrize("url_kind", ["plain http", "secured endpoint over http"])
def test_credentials_over_plain_http_are_refused_at_start_in_production(stack, secure, tmp_path, url_kind):
    """A production gateway given credentials and an http:// URL does not start: the key would travel
    in clear. The error names the setting and never the secret."""
    url = stack.es_url if url_kind == "plain http" else secure["URL"].replace("https://", "http://")
    db = f"sqlite:///{tmp_path / 'refused.db'}"
    _reset_database(db)
    env = {**os.environ, **stack.settings_env, "COMPLIANCE_DATABASE_URL": db,
           "COMPLIANCE_ENVIRONMENT": "production",
           # the production checks that come before Elasticsearch's, met
           "COMPLIANCE_OIDC_ISSUER": "https://keycloak.example/realms/imaging",
           **es_env(url, api_key=secure["API_KEY"])}
    port = _free_port()
    run = subprocess.run([sys.executable, "-m", "compliance.cli", "serve", "--port", str(port)], cwd=PROJECT_ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "COMPLIANCE_ELASTICSEARCH_URL must be https:// outside development" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    assert secure["API_KEY"] not in run.stdout + run.stderr


# ------------------------------------------------------------------ the CLI reads through the secured endpoint


def test_the_cli_searches_reports_and_verifies_through_the_secured_endpoint(deployment, secure, tmp_path):
    es = es_env(secure["URL"], ca_file=secure["CA_FILE"], api_key=secure["API_KEY"])
    deployment.start(es)
    deployment.query_as_alice("ESTLS-CLI")
    assert AuditIndex(deployment.stack.es_url, deployment.prefix).wait_for(1, **{"event.id": "110112"})
    assert wait_for(lambda: outbox(deployment.db)[1] == 0)
    before = len(proxy_requests(deployment.prefix))

    search = deployment.cli("audit", "search", "--user", "alice", "--event-type", "110112", es=es)
    assert search.returncode == 0, search.stderr
    assert json.loads(search.stdout)["total"] == 1

    report = deployment.cli("audit", "report", "user-activity", "--user", "alice", es=es)
    assert report.returncode == 0, report.stderr
    assert "110112" in report.stdout or "ESTLS-CLI" in report.stdout, report.stdout[:2000]

    verify = deployment.cli("audit", "verify", es=es)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "intact" in verify.stdout

    detect = deployment.cli("audit", "detect", es=es)
    assert detect.returncode == 0, detect.stdout + detect.stderr

    prune = deployment.cli("audit", "prune", "--dry-run", es=es)  # it lists the indices: none is past retention
    assert prune.returncode == 0, prune.stdout + prune.stderr
    assert json.loads(prune.stdout) == {"would_delete": [], "kept": {}}

    # those reads went through the proxy, authenticated with the key
    after = proxy_requests(deployment.prefix)[before:]
    assert after and all("auth=api_key tls=TLSv1." in line for line in after), after
    assert not any('" 401 ' in line for line in after), after

    # the same commands with a CA that did not sign the cluster: a clear error, nothing read
    wrong = es_env(secure["URL"], ca_file=another_ca(tmp_path), api_key=secure["API_KEY"])
    refused = deployment.cli("audit", "search", "--user", "alice", es=wrong)
    assert refused.returncode != 0
    assert "TLS handshake failed" in refused.stderr, refused.stderr
    assert secure["API_KEY"] not in refused.stdout + refused.stderr
    missing = deployment.cli("audit", "search", "--user", "alice",
                             es=es_env(secure["URL"], ca_file=tmp_path / "no-such-ca.pem", api_key=secure["API_KEY"]))
    assert missing.returncode != 0
    assert "cannot read the Elasticsearch CA file" in missing.stderr, missing.stderr
    assert "Traceback" not in missing.stderr
