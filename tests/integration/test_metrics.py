from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.integration


def test_metrics_show_the_outbox_and_the_chain(gateway, stack):
    token = stack.token("alice")
    httpx.get(f"{gateway.url}/dicom-web/studies", params={"PatientID": "METRICS"},
              headers={"Authorization": f"Bearer {token}"}, timeout=30)
    # an operator's endpoint: a bearer token with system:status:read (the admin role)
    assert httpx.get(f"{gateway.url}/metrics", timeout=30).status_code == 401
    r = httpx.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {stack.token('ada')}"}, timeout=30)
    assert r.status_code == 200, r.text
    text = r.text
    values = dict(line.split() for line in text.splitlines() if line and not line.startswith("#"))
    assert int(values["compliance_audit_outbox_recorded"]) > 0
    # every recorded event is on the chain, so the head position equals the count
    assert int(values["compliance_audit_chain_head_seq"]) == int(values["compliance_audit_outbox_recorded"])
    assert values["compliance_audit_shipper_up"] in ("0", "1")
    assert int(values["compliance_audit_outbox_backlog"]) >= 0
