from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest

from .conftest import Gateway, Stack, drop_prefix, own_database, start_gateway, stop_gateway

pytestmark = pytest.mark.integration


def read_metrics(gateway: Gateway, stack: Stack) -> dict[str, str]:
    """The gauges of ``GET /metrics``, read with an operator's token (``system:status:read``, the admin role)."""
    r = httpx.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {stack.token('ada')}"}, timeout=30)
    assert r.status_code == 200, r.text
    return dict(line.split() for line in r.text.splitlines() if line and not line.startswith("#"))


def test_metrics_show_the_outbox_and_the_chain(gateway, stack):
    token = stack.token("alice")
    httpx.get(f"{gateway.url}/dicom-web/studies", params={"PatientID": "METRICS"},
              headers={"Authorization": f"Bearer {token}"}, timeout=30)
    # an operator's endpoint: a bearer token with system:status:read (the admin role)
    assert httpx.get(f"{gateway.url}/metrics", timeout=30).status_code == 401
    values = read_metrics(gateway, stack)
    assert int(values["compliance_audit_outbox_recorded"]) > 0
    # every recorded event is on the chain, so the head position equals the count
    assert int(values["compliance_audit_chain_head_seq"]) == int(values["compliance_audit_outbox_recorded"])
    # the test gateway's shipper runs against the stack's Elasticsearch: up, and it drains the backlog
    assert values["compliance_audit_shipper_up"] == "1"
    deadline = time.monotonic() + 30
    while int(values["compliance_audit_outbox_backlog"]) != 0 and time.monotonic() < deadline:
        time.sleep(0.3)
        values = read_metrics(gateway, stack)
    assert values["compliance_audit_outbox_backlog"] == "0", values
    assert values["compliance_audit_shipper_up"] == "1"


def test_the_backlog_counts_what_is_recorded_and_not_shipped(stack: Stack, tmp_path: Path):
    """A gateway whose shipper does not run: every event it records stays in the backlog."""
    prefix = f"test-metrics-{uuid.uuid4().hex[:10]}"
    with own_database(stack, tmp_path, "metrics") as db:
        gw = start_gateway(stack, tmp_path, database_url=db, index_prefix=prefix,
                           extra_env={"COMPLIANCE_AUDIT_SHIPPER_ENABLED": "false"})
        try:
            before = read_metrics(gw, stack)
            # at least the gateway's start (110100), nothing delivered
            assert int(before["compliance_audit_outbox_backlog"]) >= 1
            assert before["compliance_audit_outbox_backlog"] == before["compliance_audit_outbox_recorded"]
            # a refused request is audited (110113) before its 401 leaves
            assert httpx.get(f"{gw.url}/metrics", timeout=30).status_code == 401
            after = read_metrics(gw, stack)
            assert int(after["compliance_audit_outbox_backlog"]) > int(before["compliance_audit_outbox_backlog"])
            assert after["compliance_audit_outbox_backlog"] == after["compliance_audit_outbox_recorded"]
        finally:
            stop_gateway(gw)
            drop_prefix(stack, prefix)
