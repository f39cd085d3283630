"""The command line against the real stack: what an operator types and sees."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest

from compliance.config import PROJECT_ROOT

pytestmark = pytest.mark.integration


def compliance(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "compliance.cli", *args], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120, env=env)


def test_token_prints_an_access_token_for_the_demo_user(stack):
    out = compliance("token", "alice")
    assert out.returncode == 0, out.stderr
    payload = out.stdout.strip().split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["preferred_username"] == "alice"
    assert "clinician" in claims["realm_access"]["roles"]
    assert "compliance-gateway" in (claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]])


def test_token_with_a_wrong_password_fails_clearly(stack):
    import os

    out = compliance("token", "alice", env={**os.environ, "COMPLIANCE_TOKEN_PASSWORD": "wrong"})
    assert out.returncode == 1
    assert out.stdout == ""
    assert "Keycloak refused the login for 'alice'" in out.stderr


def test_audit_status_reports_the_outbox(stack, tmp_path):
    import os

    env = {**os.environ, "COMPLIANCE_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}"}
    out = compliance("audit", "status", env=env)
    assert out.returncode == 1
    assert "compliance db upgrade" in out.stderr
    assert compliance("db", "upgrade", env=env).returncode == 0
    out = compliance("audit", "status", env=env)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert (status["recorded"], status["backlog"], status["chain_head"]["seq"]) == (0, 0, 0)
    assert status["last_checkpoint"] is None
