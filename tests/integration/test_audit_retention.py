"""`compliance audit prune` on the real Elasticsearch: whole months past retention, never a held one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import create_engine, text

from compliance.config import PROJECT_ROOT
from compliance.db.migrate import upgrade

from .conftest import Stack

pytestmark = pytest.mark.integration


def test_prune_deletes_only_old_unheld_months_and_refuses_the_rest(stack: Stack, tmp_path):
    prefix = f"test-prune-{uuid.uuid4().hex[:10]}"
    this_month = f"{datetime.now(UTC):%Y.%m}"
    months = {"2014.02": None, "2015.01": None, "2016.03": "HELD-PATIENT", "2017.07": None, this_month: None}
    from compliance.audit.elasticsearch import ElasticsearchAuditSink

    ElasticsearchAuditSink(stack.es_url, prefix).ensure_ready()  # the events' template, as the gateway installs it
    for month, patient in months.items():
        httpx.post(f"{stack.es_url}/{prefix}-{month}/_doc", params={"refresh": "true"}, timeout=30,
                   json={"@timestamp": "2015-01-01T00:00:00Z", "patient.ids": [patient or "OTHER"]}
                   ).raise_for_status()
    policy = tmp_path / "retention.yaml"
    policy.write_text("audit_events_years: 6\nlegal_holds:\n"
                      "  - {id: LH-MONTH, reason: litigation, months: ['2017.07']}\n"
                      "  - {id: LH-PATIENT, reason: subpoena, patient_ids: [HELD-PATIENT]}\n")
    db = f"sqlite:///{tmp_path / 'prune.db'}"
    upgrade(db)
    env = {**os.environ, "COMPLIANCE_AUDIT_INDEX_PREFIX": prefix, "COMPLIANCE_DATABASE_URL": db,
           "COMPLIANCE_RETENTION_POLICY_FILE": str(policy)}

    def prune(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "compliance.cli", "audit", "prune", *args], cwd=PROJECT_ROOT,
                              env=env, capture_output=True, text=True, timeout=120)

    def existing() -> set[str]:
        return set(httpx.get(f"{stack.es_url}/{prefix}-*", timeout=30).json())

    try:
        # asking for months inside the retention period is refused outright: nothing is deleted
        out = prune("--before", this_month)
        assert out.returncode == 2, out.stdout + out.stderr
        assert "retention" in out.stderr
        assert len(existing()) == 5
        # otherwise the old months go, the held ones stay and are named, the exit status says so
        out = prune()
        assert out.returncode == 1, out.stdout + out.stderr
        report = json.loads(out.stdout)
        assert sorted(report["deleted"]) == [f"{prefix}-2014.02", f"{prefix}-2015.01"]
        assert "LH-PATIENT" in report["kept"][f"{prefix}-2016.03"]
        assert "LH-MONTH" in report["kept"][f"{prefix}-2017.07"]
        assert existing() == {f"{prefix}-2016.03", f"{prefix}-2017.07", f"{prefix}-{this_month}"}
        # the deletion was audited before it happened (110101, action D) in the outbox
        engine = create_engine(db)
        with engine.connect() as conn:
            docs = [json.loads(r[0]) for r in conn.execute(text("select document from audit_outbox"))]
        engine.dispose()
        assert [(d["event.id"], d["event.action"]) for d in docs] == [("110101", "D")]
        assert f"{prefix}-2014.02" in docs[0]["atna.xml"] or "prune" in docs[0]["atna.xml"]
    finally:
        for index in existing():
            httpx.delete(f"{stack.es_url}/{index}", timeout=30)
        httpx.delete(f"{stack.es_url}/_index_template/{prefix}-events", timeout=30)
