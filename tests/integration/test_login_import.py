"""Keycloak's login events in the audit trail, on the real stack: `compliance audit import-logins`.

Real logins at the stack's Keycloak (password grant of the demo CLI client, from 127.0.0.1): refused
ones for an account that does not exist and a successful one. The import copies Keycloak's stored
events into a deployment of the test's own (database and indices, no gateway: `compliance audit
ship` delivers), once each; the failed-authentication burst detection then sees the refused logins.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from compliance.config import PROJECT_ROOT

from .conftest import AuditIndex, Stack, dump, private_trail
from .test_detections import cli

pytestmark = pytest.mark.integration

NOBODY = f"nobody-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def trail(stack: Stack, tmp_path):
    with private_trail(stack, tmp_path, "logins", {
        "version": 1, "timezone": "UTC", "settle_seconds": 1, "initial_lookback_hours": 1,
        "rules": {"failed_auth_burst": {"alert_type": "110143", "outcome": 8, "threshold": 10,
                                        "window_seconds": 300}}},
    ) as trail:
        yield trail


def login(stack: Stack, username: str, password: str) -> int:
    return httpx.post(f"{stack.keycloak_url}/realms/imaging/protocol/openid-connect/token",
                      data={"grant_type": "password", "client_id": "compliance-cli", "username": username,
                            "password": password}, timeout=30).status_code


def test_keycloak_logins_are_imported_once_and_refused_ones_raise_the_burst_alert(stack: Stack, trail):
    env, prefix, policy = trail
    started = datetime.now(UTC) - timedelta(seconds=2)
    assert [login(stack, NOBODY, "guess") for _ in range(10)] == [401] * 10
    assert login(stack, "rob", "demo-rob") == 200

    first = cli(env, "audit", "import-logins", "--since", started.isoformat())
    assert first["imported"] >= 11, first
    # From the cursor, read back OVERLAP (five minutes, so it may also import other tests' logins
    # of that time): what the first run recorded is not recorded again.
    again = cli(env, "audit", "import-logins")
    assert again["already_recorded"] >= 11, again
    assert cli(env, "audit", "ship")["backlog"] == 0
    httpx.post(f"{stack.es_url}/{prefix}-*/_refresh", timeout=30).raise_for_status()
    index = AuditIndex(stack.es_url, prefix)

    refused = index.search(**{"event.id": "110114", "user.name": NOBODY})
    assert len(refused) == 10, dump(refused)  # each Keycloak event exactly once
    for doc in refused:
        assert (doc["event.outcome"], doc["user.id"], doc["source.address"]) == (4, f"unverified:{NOBODY}",
                                                                                  "127.0.0.1"), dump(doc)
        assert doc["event.type_codes"] == ["110122"]
        assert doc["event.outcome_description"].startswith("Keycloak LOGIN_ERROR, client compliance-cli")
        assert doc["event.outcome_description"].endswith(": user_not_found")
        assert "<EventID csd-code=\"110114\"" in doc["atna.xml"]
    (ok,) = [d for d in index.search(**{"event.id": "110114", "user.name": "rob"})
             if d["@timestamp"] >= started.isoformat()[:19]]
    assert ok["event.outcome"] == 0 and not ok["user.id"].startswith("unverified:")

    service = [d for d in index.search(**{"event.id": "110114"}) if "CLIENT_LOGIN" in d["event.outcome_description"]]
    assert service and {d["event.outcome_description"] for d in service} == {
        "Keycloak CLIENT_LOGIN, client compliance-gateway, grant type client_credentials"}, dump(service)

    time.sleep(2)  # past settle_seconds
    found = cli(env, "audit", "detect", "--policy", policy, "--since", started.isoformat())
    assert found["rules"] == ["failed_auth_burst"] and found["findings"] == 1, found
    assert cli(env, "audit", "ship")["backlog"] == 0
    httpx.post(f"{stack.es_url}/{prefix}-*/_refresh", timeout=30).raise_for_status()
    (alert,) = index.search(**{"event.id": "110113", "event.type_codes": "110143"})
    assert "refused authentications from 127.0.0.1" in alert["event.outcome_description"]
    assert NOBODY in alert["event.outcome_description"]


def import_logins(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "compliance.cli", "audit", "import-logins", *args], cwd=PROJECT_ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_import_logins_refuses_bad_input_and_an_unreachable_keycloak_changing_nothing(stack: Stack, trail):
    env, _, _ = trail
    out = import_logins({**env, "COMPLIANCE_OIDC_CLIENT_SECRET": ""})
    assert out.returncode == 2 and "COMPLIANCE_OIDC_CLIENT_SECRET" in out.stderr
    bad = import_logins(env, "--since", "yesterday")
    assert bad.returncode == 2 and "--since" in bad.stderr
    # Keycloak out of reach: a clear message, exit 1, and nothing recorded (no cursor either)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    down = import_logins({**env, "COMPLIANCE_KEYCLOAK_URL": f"http://127.0.0.1:{dead}"})
    assert down.returncode == 1 and "cannot read login events from Keycloak" in down.stderr, down.stderr
    assert "Traceback" not in down.stderr
    assert cli(env, "audit", "status")["recorded"] == 0
