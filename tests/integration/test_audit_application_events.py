"""110114 User Authentication (the CLI's logins) and 110100 Application Activity reach the repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from sqlalchemy import create_engine, text

from compliance.config import PROJECT_ROOT
from compliance.db.migrate import upgrade

from .conftest import AuditIndex, Stack, _reset_database, drop_prefix, start_gateway, stop_gateway

pytestmark = pytest.mark.integration


def outbox_documents(db: str) -> list[dict]:
    engine = create_engine(db)
    with engine.connect() as conn:
        docs = [json.loads(r[0]) for r in conn.execute(text("select document from audit_outbox order by seq"))]
    engine.dispose()
    return docs


def test_cli_logins_are_recorded_as_110114_success_and_failure(stack: Stack, tmp_path):
    db = f"sqlite:///{tmp_path / 'auth.db'}"
    upgrade(db)
    env = {**os.environ, "COMPLIANCE_DATABASE_URL": db}
    ok = subprocess.run([sys.executable, "-m", "compliance.cli", "token", "alice"], cwd=PROJECT_ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "compliance.cli", "token", "alice"], cwd=PROJECT_ROOT,
                         env={**env, "COMPLIANCE_TOKEN_PASSWORD": "wrong"}, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 1
    docs = outbox_documents(db)
    assert [(d["event.id"], d["event.outcome"], d["user.name"]) for d in docs] == [
        ("110114", 0, "alice"), ("110114", 8, "alice")]
    assert docs[0]["event.type_codes"] == ["110122"]  # Login
    assert docs[0]["user.id"] not in ("", None) and not docs[0]["user.id"].startswith("unverified:")
    assert "refused" in docs[1]["event.outcome_description"]


def test_gateway_start_and_stop_are_shipped(stack: Stack, tmp_path):
    prefix = f"test-appact-{uuid.uuid4().hex[:10]}"
    db = f"sqlite:///{tmp_path / 'app.db'}"
    _reset_database(db)
    gw = start_gateway(stack, tmp_path, database_url=db, index_prefix=prefix)
    stop_gateway(gw)  # a clean stop records 110100 Stop and drains the outbox before exiting
    try:
        docs = AuditIndex(stack.es_url, prefix).wait_for(2, **{"event.id": "110100"})
        assert sorted(d["event.type_codes"][0] for d in docs) == ["110120", "110121"]  # start, stop
    finally:
        drop_prefix(stack, prefix)
