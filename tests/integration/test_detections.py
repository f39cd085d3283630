"""Detections on the real stack: `compliance audit detect` over seeded events, alerts, the review queue.

Seeded activity (documents made by the real builders, in this module's own indices) for Monday
3 March 2025 and the two weeks before; real Keycloak accounts (created for the test, one disabled,
one sharing a patient's family name); the job runs as the CLI a cron would run, with an explicit
window (the clock), and its findings are read back through the gateway's API as the privacy officer.

Each run's read of the trail is a 110101 event in Elasticsearch, naming the operating-system user.
An event recorded while Elasticsearch is out of reach (in the outbox, unshipped) holds the window
back; once it is shipped, the next run examines it and raises its alert, once.
"""

from __future__ import annotations

import base64
import getpass
import json
import re
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from keycloak import KeycloakAdmin

from compliance.audit.atna import AuditSource
from compliance.audit.codes import EventTypeCode, Outcome
from compliance.audit.events import instances_transferred_event, security_alert_event
from compliance.audit.message import PatientRef, StudyRef, UserRef
from compliance.audit.outbox import SqlAuditOutbox
from compliance.audit.recorder import AuditRecorder
from compliance.audit.review import SqlReviewQueue
from compliance.config import PROJECT_ROOT, load_settings
from compliance.db.session import make_engine

from .conftest import AuditIndex, Stack, _reset_database, drop_prefix, private_trail, start_gateway, stop_gateway
from .test_privacy_officer_api import seed

pytestmark = pytest.mark.integration

GW = "compliance-gateway"
TAG = uuid.uuid4().hex[:6]
FAMILY_USER = f"det-fam-{TAG}"
DISABLED_USER = f"det-off-{TAG}"
DOE = PatientRef("DET-PAT-1", "Doe^Jane")
OTHER = PatientRef("DET-PAT-2", "Smith^John")
VIP = PatientRef("VIP-DEMO-001", "Important^Person")
STUDY = StudyRef("1.2.826.0.1.3680043.10.512.1")
DAY = datetime(2025, 3, 3, tzinfo=UTC)  # a Monday


def user(name: str, address: str = "10.0.0.1") -> UserRef:
    return UserRef(f"sub-{name}", name, "ohif-viewer", ("clinician",), address)


def access(who: str, when: datetime, patient: PatientRef = OTHER):
    return instances_transferred_event(user=user(who), gateway_id=GW, source_id="orthanc", outcome=Outcome.SUCCESS,
                                       patients=[patient], studies=[STUDY], occurred_at=when)


def refused(address: str, when: datetime):
    return security_alert_event(user=None, gateway_id=GW, alert_type=EventTypeCode.AUTHENTICATION_DECISION,
                                description="refused credentials", resource="/dicom-web/studies",
                                source_address=address, alternative_user_id="guess", occurred_at=when)


def seeded_events() -> list:
    events = [
        access("alice", DAY + timedelta(hours=2, minutes=13)),      # after hours
        access("alice", DAY + timedelta(hours=10)),                 # business hours
        access(FAMILY_USER, DAY + timedelta(hours=10, minutes=5), DOE),
        access("alice", DAY + timedelta(hours=10, minutes=6), DOE),  # alice is no Doe
        access("rita", DAY + timedelta(hours=11), VIP),
        access(DISABLED_USER, DAY + timedelta(hours=12)),
    ]
    for day in range(1, 15):  # the baselines: vol-user 2 a day, steady 60 a day
        base = DAY - timedelta(days=day) + timedelta(hours=9)
        events += [access("vol-user", base + timedelta(minutes=m)) for m in range(2)]
        events += [access("steady", base + timedelta(seconds=20 * m)) for m in range(60)]
    events += [access("vol-user", DAY + timedelta(hours=9, seconds=20 * m)) for m in range(60)]
    events += [access("steady", DAY + timedelta(hours=9, seconds=20 * m)) for m in range(60)]
    events += [refused("10.6.6.6", DAY + timedelta(hours=14, seconds=10 * i)) for i in range(12)]
    events += [refused("10.7.7.7", DAY + timedelta(hours=15, seconds=10 * i)) for i in range(5)]
    return events


@pytest.fixture(scope="module")
def keycloak_users(stack: Stack):
    # Creating accounts needs Keycloak's own administrator (secrets.env of the local stack); the
    # gateway's settings never hold it: the detections read accounts with the gateway's service account.
    assert "COMPLIANCE_KEYCLOAK_ADMIN_PASSWORD" not in stack.settings_env
    secrets = dict(line.split("=", 1) for line in (load_settings().stack_dir / "secrets.env").read_text().splitlines()
                   if "=" in line)
    admin = KeycloakAdmin(server_url=stack.keycloak_url.rstrip("/") + "/", username="admin",
                          password=secrets["KEYCLOAK_ADMIN_PASSWORD"], realm_name="imaging", user_realm_name="master")
    ids = [admin.create_user({"username": FAMILY_USER, "firstName": "Jo", "lastName": "Doe", "enabled": True,
                              "email": f"{FAMILY_USER}@example.org"}),
           admin.create_user({"username": DISABLED_USER, "firstName": "Ex", "lastName": "Employee", "enabled": False,
                              "email": f"{DISABLED_USER}@example.org"})]
    yield
    for uid in ids:
        admin.delete_user(uid)


@pytest.fixture(scope="module")
def det_gateway(stack: Stack, tmp_path_factory, keycloak_users):
    tmp = tmp_path_factory.mktemp("detections")
    prefix = f"test-det-{uuid.uuid4().hex[:10]}"
    db = f"sqlite:///{tmp / 'detections.db'}"
    _reset_database(db)
    seed(stack.es_url, prefix, seeded_events())
    gw = start_gateway(stack, tmp, database_url=db, index_prefix=prefix)
    yield gw
    stop_gateway(gw)
    drop_prefix(stack, prefix)


def cli(env: dict[str, str], *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "compliance.cli", *args], cwd=PROJECT_ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def gw_env(gw) -> dict[str, str]:
    return {**gw.env, "COMPLIANCE_DATABASE_URL": gw.database_url, "COMPLIANCE_AUDIT_INDEX_PREFIX": gw.index_prefix}


def detect(gw, *args: str) -> dict:
    return cli(gw_env(gw), "audit", "detect", *args)


def shipped(env: dict[str, str], es_url: str, uuid_: str) -> dict:
    """The document of event ``uuid_`` once everything recorded so far is shipped and searchable.

    ``compliance audit ship`` returns after Elasticsearch acknowledged every pending event (a gateway
    shipping the same rows meanwhile only makes some of them no-ops); the refresh makes them visible.
    """
    assert cli(env, "audit", "ship")["backlog"] == 0
    prefix = env["COMPLIANCE_AUDIT_INDEX_PREFIX"]
    httpx.post(f"{es_url}/{prefix}-*/_refresh", timeout=30).raise_for_status()
    hits = AuditIndex(es_url, prefix).search(**{"event.uuid": uuid_})
    assert len(hits) == 1, hits
    return hits[0]


def query_of(doc: dict) -> str:
    # the 110101 message keeps the request as a "Query" ParticipantObjectDetail (base64)
    found = re.search(r'type="Query"[^>]*value="([^"]*)"', doc["atna.xml"])
    return base64.b64decode(found.group(1)).decode() if found else ""


WINDOW = ("--since", "2025-03-03T00:00:00Z", "--until", "2025-03-04T00:00:00Z")


def test_detections_raise_alerts_into_the_review_queue(stack, det_gateway):
    run = detect(det_gateway, *WINDOW)
    assert run["findings"] == 6
    assert len(run["opened"]) == 6
    priya = {"Authorization": f"Bearer {stack.token('priya')}"}
    resp = httpx.get(f"{det_gateway.url}/api/v1/audit/alerts", params={"status": "open"}, headers=priya, timeout=30)
    assert resp.status_code == 200, resp.text
    alerts = resp.json()["alerts"]
    got = sorted((a["rule"], a["user"], a["patient"]) for a in alerts)
    assert got == sorted([
        ("after_hours", "alice", "DET-PAT-2"),
        ("volume_spike", "vol-user", None),
        ("same_family_name", FAMILY_USER, "DET-PAT-1"),
        ("vip_access", "rita", "VIP-DEMO-001"),
        ("disabled_account", DISABLED_USER, None),
        ("failed_auth_burst", None, None),
    ])
    burst = next(a for a in alerts if a["rule"] == "failed_auth_burst")
    assert "12 refused authentications from 10.6.6.6" in burst["summary"]
    assert len(burst["evidence"]) == 12
    after = next(a for a in alerts if a["rule"] == "after_hours")
    assert "first at 02:13" in after["summary"] and len(after["evidence"]) == 1

    # Each finding is a 110113 alert in the audit trail, recorded through the outbox and shipped.
    index = AuditIndex(stack.es_url, det_gateway.index_prefix)
    docs = _wait_alerts(index, 6)
    assert sorted(d["event.uuid"] for d in docs) == sorted(a["alert_uuid"] for a in alerts)
    vip = next(d for d in docs if "urn:compliance:detection:vip_access" in d["object.ids"])
    assert (vip["user.name"], vip["patient.ids"], vip["event.type_codes"]) == ("rita", ["VIP-DEMO-001"], ["110132"])
    # the run's read of the trail was recorded (110101) before any of its alerts
    used = shipped(gw_env(det_gateway), stack.es_url, run["audit_log_used"])
    assert used["event.id"] == "110101"
    assert used["chain.seq"] < min(d["chain.seq"] for d in docs)

    # A second run over the same window finds the same and queues nothing new.
    again = detect(det_gateway, *WINDOW)
    assert (again["findings"], again["opened"]) == (6, [])


def _wait_alerts(index: AuditIndex, expected: int) -> list[dict]:
    """The detection alerts in the index (shipping is asynchronous: bounded wait, then return)."""
    deadline = time.monotonic() + 30
    docs: list[dict] = []
    while time.monotonic() < deadline:
        httpx.post(f"{index.es_url}/{index.prefix}-*/_refresh", timeout=30)
        resp = httpx.post(f"{index.es_url}/{index.prefix}-*/_search", timeout=30, json={
            "size": 100, "query": {"prefix": {"object.ids": "urn:compliance:detection:"}}})
        docs = [h["_source"] for h in resp.json()["hits"]["hits"]]
        if len(docs) >= expected:
            break
        time.sleep(0.3)
    return docs


def test_acknowledging_an_alert(stack, det_gateway):
    priya = {"Authorization": f"Bearer {stack.token('priya')}"}
    url = f"{det_gateway.url}/api/v1/audit/alerts"
    detect(det_gateway, *WINDOW)
    open_before = httpx.get(url, params={"status": "open"}, headers=priya, timeout=30).json()["alerts"]
    assert open_before
    target = open_before[0]["id"]
    resp = httpx.post(f"{url}/{target}", json={"status": "acknowledged", "note": "reviewed with the manager"},
                      headers=priya, timeout=30)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["status"], body["acknowledged_by"], body["note"]) == ("acknowledged", "priya",
                                                                        "reviewed with the manager")
    again = httpx.post(f"{url}/{target}", json={"status": "acknowledged"}, headers=priya, timeout=30)
    assert again.status_code == 409
    assert httpx.post(f"{url}/999999", json={"status": "acknowledged"}, headers=priya, timeout=30).status_code == 404
    assert httpx.post(f"{url}/{target}", json={"status": "open"}, headers=priya, timeout=30).status_code == 400
    open_after = httpx.get(url, params={"status": "open"}, headers=priya, timeout=30).json()["alerts"]
    assert [a["id"] for a in open_after] == [a["id"] for a in open_before if a["id"] != target]
    acked = httpx.get(url, params={"status": "acknowledged"}, headers=priya, timeout=30).json()["alerts"]
    assert [a["id"] for a in acked] == [target]
    # every acknowledgement is audited before it is committed; a refused one is recorded with its reason
    index = AuditIndex(stack.es_url, det_gateway.index_prefix)
    acks: list[dict] = []
    for _ in range(100):  # three acknowledgements asked for, two refused: five events
        httpx.post(f"{stack.es_url}/{det_gateway.index_prefix}-*/_refresh", timeout=30)
        acks = [d for d in index.search(**{"event.id": "110101", "user.name": "priya"})
                if '"acknowledge"' in query_of(d)]
        if len(acks) >= 5:
            break
        time.sleep(0.3)
    steps = sorted((d["event.outcome"], d.get("event.outcome_description") or "") for d in acks)
    assert (0, "") in steps  # the successful acknowledgement's read, recorded before the change
    assert any(o == 4 and "already" in desc for o, desc in steps), steps  # the refused second one: minor


def test_each_detect_run_is_recorded_as_a_110101_event_naming_the_operator(stack, det_gateway):
    run = detect(det_gateway, *WINDOW)
    assert run["findings"] == 6 and run["examined"]["vip_access"] >= 1
    doc = shipped(gw_env(det_gateway), stack.es_url, run["audit_log_used"])
    me = getpass.getuser()
    assert (doc["event.id"], doc["event.action"], doc["event.outcome"]) == ("110101", "R", 0)
    assert (doc["user.id"], doc["user.name"], doc["client.id"]) == (f"os:{me}", me, "compliance-cli")
    assert doc["object.ids"] == [f"{stack.es_url.rstrip('/')}/{det_gateway.index_prefix}-*"]
    assert "6 finding(s)" in doc["event.outcome_description"]
    query = json.loads(query_of(doc))
    assert (query["command"], query["from"], query["to"]) == ("audit detect", "2025-03-03T00:00:00+00:00",
                                                              "2025-03-04T00:00:00+00:00")
    assert "vip_access" in query["rules"]


def test_a_run_without_a_window_starts_where_the_last_ended(det_gateway):
    run = detect(det_gateway, "--until", "2025-03-05T00:00:00Z")
    assert run["from"].startswith("2025-03-04T00:00:00")
    assert run["opened"] == []


def test_the_account_directory_reads_with_the_gateways_service_account_and_cannot_write(stack: Stack):
    """Least privilege: the detections see accounts, and that login can change nothing in Keycloak."""
    from keycloak.exceptions import KeycloakPostError

    from compliance.auth.directory import KeycloakDirectory

    directory = KeycloakDirectory(stack.keycloak_url, "imaging", client_id="compliance-gateway",
                                  client_secret=stack.settings_env["COMPLIANCE_OIDC_CLIENT_SECRET"])
    alice = directory.lookup("alice")
    assert alice is not None and alice.enabled and alice.family_name
    assert directory.lookup(f"nobody-{uuid.uuid4().hex[:8]}") is None
    # The service account reads accounts and events, and can change nothing.
    from compliance.auth.service_account import ServiceAccountAdmin

    admin = ServiceAccountAdmin(stack.keycloak_url, "imaging", client_id="compliance-gateway",
                                client_secret=stack.settings_env["COMPLIANCE_OIDC_CLIENT_SECRET"]).client()
    assert isinstance(admin.get_events({"max": 1}), list)
    with pytest.raises(KeycloakPostError) as refused:
        admin.create_user({"username": f"intruder-{uuid.uuid4().hex[:8]}", "enabled": True})
    assert refused.value.response_code == 403


# --------------------------------------------------------------------------- late-shipped events

LATE_USER = f"det-late-{TAG}"


@pytest.fixture()
def late_trail(stack: Stack, tmp_path):
    """A deployment of its own (database, indices, a policy with only the VIP rule) and no gateway: no
    shipper runs, so what is recorded stays in the outbox until ``compliance audit ship`` (the
    repository "comes back")."""
    with private_trail(stack, tmp_path, "late", {
        "version": 1, "timezone": "UTC", "settle_seconds": 60, "initial_lookback_hours": 24,
        "rules": {"vip_access": {"alert_type": "110132", "outcome": 4,
                                 "patients_file": str(PROJECT_ROOT / "policies" / "vip-patients.yaml")}}},
    ) as (env, _, policy):
        yield env, env["COMPLIANCE_DATABASE_URL"], policy


def test_an_event_shipped_after_settle_seconds_is_examined_by_the_next_run(stack, late_trail):
    env, db, policy = late_trail
    engine = make_engine(db)
    try:
        # Recorded ten minutes ago (far beyond settle_seconds), not shipped: Elasticsearch was down.
        late = access(LATE_USER, datetime.now(UTC) - timedelta(minutes=10), VIP)
        AuditRecorder(SqlAuditOutbox(engine), AuditSource("compliance-gateway", "test")).record_now(late)

        first = cli(env, "audit", "detect", "--policy", policy)
        held_at = late.occurred_at.replace(microsecond=late.occurred_at.microsecond // 1000 * 1000)
        assert first["to"] == held_at.isoformat()  # the window stops at the unshipped event ...
        assert first["requested_to"] > first["to"]
        assert first["held_back"]["pending_events"] == 1
        assert (first["findings"], first["opened"]) == (0, [])

        shipped(env, stack.es_url, late.uuid)  # ... the repository is back: the backlog is shipped
        second = cli(env, "audit", "detect", "--policy", policy)
        assert second["from"] == first["to"] and second["held_back"] is None
        assert (second["findings"], second["rules"], second["examined"]) == (1, ["vip_access"], {"vip_access": 1})
        assert len(second["opened"]) == 1

        queue = SqlReviewQueue(engine)
        [item] = queue.list()
        assert (item.id, item.rule, item.user_name, item.patient_id, item.evidence) == (
            second["opened"][0], "vip_access", LATE_USER, "VIP-DEMO-001", (late.uuid,))
        alert = shipped(env, stack.es_url, item.alert_uuid)
        assert (alert["event.id"], alert["user.name"], alert["patient.ids"]) == ("110113", LATE_USER,
                                                                                 ["VIP-DEMO-001"])

        # the next run starts where this one ended; re-examining the window queues nothing twice
        third = cli(env, "audit", "detect", "--policy", policy)
        again = cli(env, "audit", "detect", "--policy", policy, "--since", second["from"], "--until", second["to"])
        assert third["from"] == second["to"] and third["opened"] == []
        assert (again["findings"], again["opened"]) == (1, [])
        assert [i.id for i in queue.list()] == [item.id]
    finally:
        engine.dispose()
