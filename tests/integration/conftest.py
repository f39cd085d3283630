"""Integration fixtures: the real local stack (deploy/local/up), a gateway process of our own.

The stack (Orthanc, Keycloak, Elasticsearch, PostgreSQL) must be running; ``deploy/local/test`` starts
it. Each test session starts its own gateway (``compliance serve``) on a free port with a fresh
database (SQLite by default; PostgreSQL when ``COMPLIANCE_TEST_DATABASE=postgres``) and a unique
audit index prefix, so the suite never touches a demo gateway's data and can be run twice in a row.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from compliance.config import PROJECT_ROOT, load_settings

pytestmark = pytest.mark.integration

#: The shared archive's log: a failed test shows the errors Orthanc logged while it ran (CI keeps
#: only the test output, and the stack is gone afterwards).
ORTHANC_LOG = load_settings().stack_dir / "logs" / "orthanc.log"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    try:
        item.stash[_LOG_OFFSET] = ORTHANC_LOG.stat().st_size
    except OSError:
        pass
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed or _LOG_OFFSET not in item.stash:
        return
    try:
        with open(ORTHANC_LOG, "rb") as f:
            f.seek(item.stash[_LOG_OFFSET])
            text = f.read(256 * 1024).decode("utf-8", "replace")
    except OSError:
        return
    # error lines (E1130 ...) and the Python tracebacks the storage plugin logs under them: not
    # Orthanc's info, warning and trace lines
    errors = [line for line in text.splitlines() if line.strip() and not _ORTHANC_CHATTER.match(line)]
    if errors:
        report.sections.append(("Orthanc's errors during the test", "\n".join(errors[-60:])))


_LOG_OFFSET = pytest.StashKey[int]()
_ORTHANC_CHATTER = re.compile(r"^[IWT]\d{4} ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    settings_env: dict[str, str]
    orthanc_url: str
    orthanc_auth: tuple[str, str]
    keycloak_url: str
    es_url: str
    postgres_url: str | None

    def token(self, username: str, password: str | None = None) -> str:
        resp = httpx.post(
            f"{self.keycloak_url}/realms/imaging/protocol/openid-connect/token",
            data={"grant_type": "password", "client_id": "compliance-cli", "username": username,
                  "password": password or f"demo-{username}"},
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
        return str(resp.json()["access_token"])


@pytest.fixture(scope="session")
def stack() -> Stack:
    settings = load_settings()
    env_file = settings.stack_dir / "gateway.env"
    if not env_file.is_file():
        pytest.fail(f"the local stack is not set up ({env_file} missing): run deploy/local/up", pytrace=False)
    values = dict(
        line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line and not line.startswith("#")
    )
    st = Stack(
        settings_env=values,
        orthanc_url=settings.archive_url,
        orthanc_auth=(settings.archive_username, settings.archive_password.get_secret_value()),
        keycloak_url=settings.keycloak_url,
        es_url=settings.elasticsearch_url,
        postgres_url=values.get("COMPLIANCE_POSTGRES_URL"),
    )
    for name, url, auth in [
        ("Orthanc", f"{st.orthanc_url}/system", st.orthanc_auth),
        ("Keycloak", f"{st.keycloak_url}/realms/imaging/.well-known/openid-configuration", None),
        ("Elasticsearch", f"{st.es_url}/_cluster/health", None),
    ]:
        try:
            httpx.get(url, auth=auth, timeout=10).raise_for_status()
        except httpx.HTTPError as exc:
            pytest.fail(f"{name} is not reachable at {url} ({exc}): run deploy/local/up", pytrace=False)
    return st


@dataclass
class Gateway:
    url: str
    index_prefix: str
    database_url: str
    process: subprocess.Popen
    log_path: Path
    env: dict[str, str]


@contextmanager
def own_database(stack: Stack, tmp: Path, name: str) -> Iterator[str]:
    """A migrated database that only the caller's gateway uses: a SQLite file in ``tmp``, or with
    ``COMPLIANCE_TEST_DATABASE=postgres`` a scratch schema of the stack's PostgreSQL, dropped afterwards.

    Never the stack's database itself: two gateways on one outbox would each ship the other's events
    to its own index prefix (the integration and security suites each hold a session gateway)."""
    if os.environ.get("COMPLIANCE_TEST_DATABASE", "sqlite") == "postgres":
        if not stack.postgres_url:
            pytest.fail("COMPLIANCE_TEST_DATABASE=postgres but the stack has no PostgreSQL URL", pytrace=False)
        from compliance.db.migrate import scratch_schema

        with scratch_schema(stack.postgres_url, name.replace("-", "_")) as url:
            yield url
        return
    url = f"sqlite:///{tmp / f'{name}.db'}"
    _reset_database(url)
    yield url


def _reset_database(url: str) -> None:
    from alembic import command

    from compliance.db.migrate import alembic_config, upgrade

    if url.startswith("postgresql"):
        command.downgrade(alembic_config(url), "base")
    upgrade(url)


def start_gateway(stack: Stack, tmp: Path, *, database_url: str, index_prefix: str,
                  extra_env: dict[str, str] | None = None) -> Gateway:
    port = _free_port()
    env = {
        **os.environ,
        **stack.settings_env,
        "COMPLIANCE_PORT": str(port),
        "COMPLIANCE_DATABASE_URL": database_url,
        "COMPLIANCE_AUDIT_INDEX_PREFIX": index_prefix,
        "COMPLIANCE_AUDIT_SHIP_INTERVAL_SECONDS": "0.2",
        "COMPLIANCE_AUDIT_SHIP_MAX_BACKOFF_SECONDS": "2",
        "COMPLIANCE_STOW_MAX_BYTES": str(8 * 1024 * 1024),
        **(extra_env or {}),
    }
    log_path = tmp / f"gateway-{port}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "compliance.cli", "serve", "--port", str(port)],
        cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the gateway exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}", pytrace=False)
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return Gateway(url, index_prefix, database_url, proc, log_path, env)
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail(f"the gateway did not become healthy:\n{log_path.read_text()[-4000:]}", pytrace=False)


def stop_process(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)


def peak_rss_mb(pid: int) -> float:
    """A process's high-water mark of resident memory (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def store_big_instance(stack: Stack, size_mb: int, patient_id: str, patient_name: str) -> tuple[int, str, str, str]:
    """A synthetic instance of about ``size_mb`` MiB stored straight into the archive (past the test
    gateways' small STOW limit): its size and its study, series and instance UIDs."""
    from compliance.demo import synthetic_instance

    data, study, series, instance = synthetic_instance(frames=size_mb * 2, patient_id=patient_id,
                                                      patient_name=patient_name)
    r = httpx.post(f"{stack.orthanc_url}/instances", content=data, auth=stack.orthanc_auth, timeout=300)
    assert r.status_code == 200, r.text
    return len(data), study, series, instance


def delete_study(stack: Stack, study_uid: str) -> None:
    """Remove a test's study from the archive (big or corrupted files must not outlive the test)."""
    found = httpx.post(f"{stack.orthanc_url}/tools/lookup", content=study_uid, auth=stack.orthanc_auth, timeout=30)
    for item in found.json():
        httpx.delete(f"{stack.orthanc_url}/studies/{item['ID']}", auth=stack.orthanc_auth, timeout=60)


def stop_gateway(gw: Gateway) -> None:
    stop_process(gw.process)


def drop_prefix(stack: Stack, prefix: str) -> None:
    """Delete a test's indices by name (the cluster refuses wildcard deletes) and its template."""
    found = httpx.get(f"{stack.es_url}/{prefix}-*,{prefix}.checkpoints", timeout=30,
                      params={"ignore_unavailable": "true", "allow_no_indices": "true"})
    for index in found.json() if found.status_code == 200 else []:
        httpx.delete(f"{stack.es_url}/{index}", timeout=30)
    httpx.delete(f"{stack.es_url}/_index_template/{prefix}-events", timeout=30)


@pytest.fixture(scope="session")
def gateway(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("gateway")
    prefix = f"test-audit-{uuid.uuid4().hex[:10]}"
    with own_database(stack, tmp, "gateway") as db:
        gw = start_gateway(stack, tmp, database_url=db, index_prefix=prefix)
        try:
            yield gw
        finally:
            stop_gateway(gw)
            drop_prefix(stack, prefix)


@contextmanager
def private_trail(stack: Stack, tmp_path: Path, name: str, policy: dict) -> Iterator[tuple[dict[str, str], str, str]]:
    """A deployment of a test's own, without a gateway: a fresh SQLite database, indices under a
    prefix of its own (deleted afterwards) and a detections policy file. Yields the CLI environment,
    the prefix and the policy's path; nothing is shipped until ``compliance audit ship``."""
    prefix = f"test-{name}-{uuid.uuid4().hex[:10]}"
    db = f"sqlite:///{tmp_path / f'{name}.db'}"
    _reset_database(db)
    policy_file = tmp_path / "detections.yaml"
    policy_file.write_text(json.dumps(policy))
    env = {**os.environ, **stack.settings_env, "COMPLIANCE_DATABASE_URL": db, "COMPLIANCE_AUDIT_INDEX_PREFIX": prefix}
    try:
        yield env, prefix, str(policy_file)
    finally:
        drop_prefix(stack, prefix)


class AuditIndex:
    """Reads the audit documents the gateway under test shipped to Elasticsearch."""

    def __init__(self, es_url: str, prefix: str) -> None:
        self.es_url = es_url
        self.prefix = prefix

    def search(self, **terms: str) -> list[dict]:
        filters = [{"term": {field.replace("__", "."): value}} for field, value in terms.items()]
        # A monthly index the gateway's shipper has just created answers 503 (no shard available) until
        # its primary has started: wait for it, briefly; anything else is the test's failure.
        deadline = time.monotonic() + 30
        while True:
            resp = httpx.post(
                f"{self.es_url}/{self.prefix}-*/_search",
                json={"query": {"bool": {"filter": filters}}, "size": 1000, "sort": [{"@timestamp": "asc"}]},
                params={"ignore_unavailable": "true", "allow_no_indices": "true"},
                timeout=30,
            )
            if resp.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        resp.raise_for_status()
        return [hit["_source"] | {"_id": hit["_id"]} for hit in resp.json()["hits"]["hits"]]

    def wait_for(self, expected: int, *, within: float = 60.0, **terms: str) -> list[dict]:
        """Poll until at least ``expected`` documents match (shipping is asynchronous), then return all.

        Waits for eventual delivery, bounded; the assertion on the count is the caller's.
        """
        deadline = time.monotonic() + within
        docs: list[dict] = []
        while time.monotonic() < deadline:
            httpx.post(f"{self.es_url}/{self.prefix}-*/_refresh", params={"ignore_unavailable": "true",
                       "allow_no_indices": "true"}, timeout=30)
            docs = self.search(**terms)
            if len(docs) >= expected:
                # give a duplicate (if any) the chance to show up before the caller counts
                time.sleep(0.5)
                httpx.post(f"{self.es_url}/{self.prefix}-*/_refresh", timeout=30)
                return self.search(**terms)
            time.sleep(0.3)
        return docs


@pytest.fixture(scope="session")
def audit(stack: Stack, gateway: Gateway) -> AuditIndex:
    return AuditIndex(stack.es_url, gateway.index_prefix)


def dump(obj: object) -> str:
    return json.dumps(obj, indent=1)[:3000]
