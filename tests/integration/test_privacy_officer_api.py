"""The privacy officer's API on the real stack: reports on seeded activity, search, paging, 403, 110101.

A gateway of this module's own (own SQLite database, own index prefix). Activity of March 2025 is
seeded straight into its Elasticsearch indices as documents made by the real builders and
``to_document`` (as the shipper would have delivered them); the gateway's own live events (now)
fall outside that period, so each report must return exactly the seeded rows.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
import uuid
import zlib
from dataclasses import replace
from datetime import UTC, datetime

import httpx
import pytest
from elasticsearch import Elasticsearch
from elasticsearch.helpers import bulk
from lxml import etree

from compliance.audit.atna import AuditSource
from compliance.audit.codes import Action, EventTypeCode, Outcome
from compliance.audit.documents import index_name, to_document
from compliance.audit.elasticsearch import ElasticsearchAuditSink
from compliance.audit.events import (
    authentication_event,
    export_event,
    instances_accessed_event,
    instances_transferred_event,
    query_event,
    security_alert_event,
)
from compliance.audit.logins import event_from_keycloak
from compliance.audit.message import PatientRef, StudyRef, UserRef
from compliance.config import PROJECT_ROOT
from compliance.exports.audit import reidentification_event

from .conftest import AuditIndex, Stack, _reset_database, drop_prefix, start_gateway, stop_gateway

pytestmark = pytest.mark.integration

SOURCE = AuditSource(source_id="compliance-gateway", enterprise_site_id="demo-hospital")
GW = "compliance-gateway"
P1 = PatientRef("PO-PAT-1", "Doe^Jane")
P2 = PatientRef("PO-PAT-2", "Roe^Richard")
S1 = StudyRef("1.2.826.0.1.3680043.10.511.1", {"1.2.840.10008.5.1.4.1.1.2": 3})
S2 = StudyRef("1.2.826.0.1.3680043.10.511.2", {"1.2.840.10008.5.1.4.1.1.4": 2})
ALICE = UserRef("sub-alice", "alice", "ohif-viewer", ("clinician",), "10.0.0.1")
RITA = UserRef("sub-rita", "rita", "ohif-viewer", ("radiologist",), "10.0.0.2")
TOM = UserRef("sub-tom", "tom", "ohif-viewer", ("technologist",), "10.0.0.3")
DANA = UserRef("sub-dana", "dana", "compliance-cli", ("data-steward",), "10.0.0.4")
OK = Outcome.SUCCESS
MARCH = {"from": "2025-03-01T00:00:00Z", "to": "2025-04-01T00:00:00Z"}


def at(day: int, hour: int, minute: int = 0, month: int = 3) -> datetime:
    return datetime(2025, month, day, hour, minute, tzinfo=UTC)


def seeded_events() -> dict[str, object]:
    return {
        "query_p1_p2": query_event(user=ALICE, gateway_id=GW, outcome=Outcome.SUCCESS, query=b"GET /studies",
                                   sop_class_uid=None, patients=[P1, P2], studies=[S1, S2], occurred_at=at(3, 9)),
        "retrieve_p1": instances_transferred_event(user=ALICE, gateway_id=GW, source_id="orthanc", outcome=OK,
                                                   patients=[P1], studies=[S1], occurred_at=at(3, 9, 1)),
        "breakglass_p1": instances_accessed_event(user=RITA, gateway_id=GW, action=Action.READ, outcome=Outcome.SUCCESS,
                                                  patients=[P1], studies=[S1], purpose_of_use=["ETREAT"],
                                                  event_type_codes=[EventTypeCode.EMERGENCY_OVERRIDE_STARTED],
                                                  occurred_at=at(4, 10)),
        "denied_p1": security_alert_event(user=TOM, gateway_id=GW, alert_type=EventTypeCode.ACCESS_CONTROL_DECISION,
                                          description="denied GET /studies/1.2: no role grants it",
                                          resource="dicomweb:/studies/1.2", patients=[P1], occurred_at=at(5, 11)),
        "export_p1_p2": export_event(user=DANA, recipient="mailto:irb@univ.example", purpose="HRESCH",
                                     patients=[P1, P2], studies=[S1, S2], occurred_at=at(6, 12)),
        "retrieve_p2": instances_transferred_event(user=ALICE, gateway_id=GW, source_id="orthanc", outcome=OK,
                                                   patients=[P2], studies=[S2], occurred_at=at(7, 13)),
        # exactly what the export workflow records when a steward reveals a pseudonym's patient
        "reidentify_p1": replace(reidentification_event(
            user=DANA, gateway_id=GW, request_id="R-77", action=Action.READ, step="revealed", patients=[P1],
            details={"Project": "HRESCH-1", "Pseudonym": "R-77"},
            description="pseudonym R-77 re-identified under dual control"), occurred_at=at(8, 14)),
        "bad_token": security_alert_event(user=None, gateway_id=GW, alert_type=EventTypeCode.AUTHENTICATION_DECISION,
                                          description="refused credentials", resource="/dicom-web/studies",
                                          source_address="10.9.9.9", alternative_user_id="mallory",
                                          occurred_at=at(9, 15)),
        # a login Keycloak refused (as compliance audit import-logins records it), and one it allowed
        "refused_login": event_from_keycloak(  # exactly as compliance audit import-logins records it
            {"id": "kc-po-1", "time": int(at(9, 16).timestamp() * 1000), "type": "LOGIN_ERROR",
             "clientId": "compliance-cli", "ipAddress": "10.9.9.8", "error": "user_not_found",
             "details": {"username": "eve", "grant_type": "password"}},
            realm_url="http://127.0.0.1:8180/realms/imaging", gateway_id=GW),
        # the CLI's own record of a refused `compliance token` login: Keycloak's event of it is the row
        "cli_refused_login": authentication_event(
            user=UserRef("unverified:eve", "eve", "compliance-cli", (), "127.0.0.1"), gateway_id=GW,
            outcome=Outcome.SERIOUS_FAILURE, authenticator_id="http://127.0.0.1:8180/realms/imaging",
            outcome_description="Keycloak refused the login: 401", occurred_at=at(9, 16, 30)),
        "login_ok": authentication_event(
            user=UserRef("sub-olga", "olga", "compliance-cli", (), "10.0.0.9"), gateway_id=GW, outcome=OK,
            authenticator_id="http://127.0.0.1:8180/realms/imaging", outcome_description="Keycloak LOGIN",
            occurred_at=at(9, 17)),
        "detection_p1": security_alert_event(user=ALICE, gateway_id=GW,
                                             alert_type=EventTypeCode.USE_OF_RESTRICTED_FUNCTION,
                                             description="alice accessed restricted patient PO-PAT-1",
                                             resource="urn:compliance:detection:vip_access", patients=[P1],
                                             occurred_at=at(10, 16)),
        "february_p1": instances_transferred_event(user=ALICE, gateway_id=GW, source_id="orthanc", outcome=OK,
                                                   patients=[P1], studies=[S1], occurred_at=at(20, 8, month=2)),
    }


EVENTS = seeded_events()


def uuid_of(name: str) -> str:
    return EVENTS[name].uuid  # type: ignore[attr-defined]


def seed(es_url: str, prefix: str, events) -> None:
    ElasticsearchAuditSink(es_url, prefix).ensure_ready()
    client = Elasticsearch(es_url, request_timeout=60)
    actions = [{"_op_type": "create", "_index": index_name(prefix, e.occurred_at), "_id": e.uuid,
                "_source": to_document(e, SOURCE)} for e in events]
    bulk(client, actions, refresh="wait_for")
    client.close()


@pytest.fixture(scope="module")
def po_gateway(stack: Stack, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("privacy")
    prefix = f"test-po-{uuid.uuid4().hex[:10]}"
    db = f"sqlite:///{tmp / 'privacy.db'}"
    _reset_database(db)
    seed(stack.es_url, prefix, EVENTS.values())
    gw = start_gateway(stack, tmp, database_url=db, index_prefix=prefix)
    yield gw
    stop_gateway(gw)
    drop_prefix(stack, prefix)


@pytest.fixture(scope="module")
def priya(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.token('priya')}"}


@pytest.fixture(scope="module")
def po_audit(stack: Stack, po_gateway) -> AuditIndex:
    return AuditIndex(stack.es_url, po_gateway.index_prefix)


def get(gw, headers, path: str, **params) -> httpx.Response:
    return httpx.get(f"{gw.url}{path}", params=params, headers=headers, timeout=60)


def report(gw, headers, kind: str, **params) -> dict:
    resp = get(gw, headers, f"/api/v1/audit/reports/{kind}", **params)
    assert resp.status_code == 200, resp.text
    return resp.json()


# --------------------------------------------------------------------------- reports


def test_patient_access_report_lists_exactly_the_accesses_to_that_patient(po_gateway, priya):
    body = report(po_gateway, priya, "patient-access", patient="PO-PAT-1", **MARCH)
    assert [r["event_uuid"] for r in body["rows"]] == [
        uuid_of("query_p1_p2"), uuid_of("retrieve_p1"), uuid_of("breakglass_p1"), uuid_of("denied_p1"),
        uuid_of("export_p1_p2")]
    rows = {r["event_uuid"]: r for r in body["rows"]}
    query = rows[uuid_of("query_p1_p2")]
    # The query also matched PO-PAT-2: the report names only this patient and none of the studies.
    assert (query["patients"], query["studies"]) == ("PO-PAT-1", "")
    assert (query["user_name"], query["source_address"], query["outcome"]) == ("alice", "10.0.0.1", 0)
    retrieve = rows[uuid_of("retrieve_p1")]
    assert (retrieve["studies"], retrieve["roles"], retrieve["client_id"]) == (S1.study_uid, "clinician", "ohif-viewer")
    assert rows[uuid_of("breakglass_p1")]["emergency"] is True
    denied = rows[uuid_of("denied_p1")]
    assert (denied["user_name"], denied["outcome"], denied["what"]) == ("tom", 4, "Attempted access, refused")
    assert body["subject"] == {"patient": "PO-PAT-1"}
    assert body["period"] == {"from": "2025-03-01T00:00:00Z", "to": "2025-04-01T00:00:00Z"}


def test_patient_access_report_default_period_reaches_back_six_years(po_gateway, priya):
    body = report(po_gateway, priya, "patient-access", patient="PO-PAT-1")
    assert uuid_of("february_p1") in [r["event_uuid"] for r in body["rows"]]
    assert len(body["rows"]) == 6


def test_accounting_of_disclosures(po_gateway, priya):
    body = report(po_gateway, priya, "disclosures", patient="PO-PAT-1", **MARCH)
    assert [(r["event_uuid"], r["kind"]) for r in body["rows"]] == [
        (uuid_of("breakglass_p1"), "break-glass"), (uuid_of("export_p1_p2"), "export"),
        (uuid_of("reidentify_p1"), "re-identification")]
    export = body["rows"][1]
    assert (export["recipient"], export["purpose"], export["disclosed_by"]) == ("mailto:irb@univ.example", "HRESCH",
                                                                                 "dana")
    assert export["date"] == "2025-03-06T12:00:00Z"
    assert body["rows"][0]["purpose"] == "ETREAT"
    assert "R-77 re-identified" in body["rows"][2]["description"]
    assert report(po_gateway, priya, "disclosures", patient="PO-PAT-2", **MARCH)["count"] == 1


def test_user_activity_report(po_gateway, priya):
    body = report(po_gateway, priya, "user-activity", user="alice", **MARCH)
    assert [r["event_uuid"] for r in body["rows"]] == [
        uuid_of("query_p1_p2"), uuid_of("retrieve_p1"), uuid_of("retrieve_p2"), uuid_of("detection_p1")]
    # By subject too.
    assert report(po_gateway, priya, "user-activity", user="sub-alice", **MARCH)["count"] == 4


def test_security_report_lists_denials_refused_logins_and_alerts(po_gateway, priya):
    body = report(po_gateway, priya, "security", **MARCH)
    assert [r["event_uuid"] for r in body["rows"]] == [
        uuid_of("denied_p1"), uuid_of("bad_token"), uuid_of("refused_login"), uuid_of("detection_p1")]
    bad = body["rows"][1]
    assert (bad["unverified_claim"], bad["source_address"], bad["resource"]) == ("mallory", "10.9.9.9",
                                                                                  "/dicom-web/studies")
    login = body["rows"][2]
    assert (login["user_name"], login["source_address"], login["alert_type"], login["outcome"]) == (
        "eve", "10.9.9.8", "Login", 4)
    assert login["description"].endswith("user_not_found")


def test_csv_has_a_header_and_the_same_rows(po_gateway, priya):
    import csv
    import io

    resp = get(po_gateway, priya, "/api/v1/audit/reports/disclosures", patient="PO-PAT-1", format="csv", **MARCH)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(resp.text)))
    assert [r["kind"] for r in rows] == ["break-glass", "export", "re-identification"]
    assert rows[1]["recipient"] == "mailto:irb@univ.example"


def _pdf_text(data: bytes) -> str:
    text = []
    for m in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", data, re.S):
        try:
            text.append(zlib.decompress(m.group(1)).decode("latin-1"))
        except zlib.error:
            text.append(m.group(1).decode("latin-1"))
    return "\n".join(text)


@pytest.mark.parametrize("kind", ["patient-access", "disclosures"])
def test_pdf_for_the_patient_names_only_that_patient(po_gateway, priya, kind):
    resp = get(po_gateway, priya, f"/api/v1/audit/reports/{kind}", patient="PO-PAT-1", format="pdf", **MARCH)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/pdf"
    assert resp.content.startswith(b"%PDF-")
    text = _pdf_text(resp.content)
    assert "PO-PAT-1" in text
    assert "Demo Hospital" in text
    assert "PO-PAT-2" not in text and "Roe" not in text
    assert S2.study_uid not in text


def test_pdf_is_refused_for_internal_reports(po_gateway, priya):
    resp = get(po_gateway, priya, "/api/v1/audit/reports/security", format="pdf")
    assert resp.status_code == 400
    assert resp.json()["error"] == "invalid_request"


# --------------------------------------------------------------------------- search


def test_search_filters(po_gateway, priya):
    def uuids(**params) -> list[str]:
        resp = get(po_gateway, priya, "/api/v1/audit/events", sort="asc", **MARCH, **params)
        assert resp.status_code == 200, resp.text
        return [e["event.uuid"] for e in resp.json()["events"]]

    assert uuids(patient="PO-PAT-1", event_type="110104") == [uuid_of("retrieve_p1")]
    assert uuids(event_type="110127") == [uuid_of("breakglass_p1")]
    assert uuids(outcome="4", user="tom") == [uuid_of("denied_p1")]
    assert uuids(source_address="10.9.9.9") == [uuid_of("bad_token")]
    assert uuids(study=S2.study_uid, user="alice") == [uuid_of("query_p1_p2"), uuid_of("retrieve_p2")]
    resp = get(po_gateway, priya, "/api/v1/audit/events", patient="PO-PAT-1", **MARCH)
    assert [e["event.uuid"] for e in resp.json()["events"]][0] == uuid_of("detection_p1")  # newest first
    assert "atna.xml" not in resp.json()["events"][0]


def test_deep_paging_returns_every_event_once(po_gateway, priya):
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"size": "2", "sort": "asc", **MARCH, **({"cursor": cursor} if cursor else {})}
        body = get(po_gateway, priya, "/api/v1/audit/events", **params).json()
        seen += [e["event.uuid"] for e in body["events"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    march = [n for n in EVENTS if n != "february_p1"]
    assert sorted(seen) == sorted(uuid_of(n) for n in march)
    assert len(seen) == len(set(seen)) == 12
    assert pages == 7  # six full pages, then an empty one ends the walk


@pytest.mark.parametrize("params", [{"size": "0"}, {"size": "5000"}, {"from": "yesterday"}, {"cursor": "@@@"},
                                    {"from": "2025-03-01T00:00:00"}, {"outcome": "3"}, {"sort": "sideways"},
                                    {"from": "2025-04-01T00:00:00Z", "to": "2025-03-01T00:00:00Z"}])
def test_bad_parameters_are_400_json(po_gateway, priya, params):
    resp = get(po_gateway, priya, "/api/v1/audit/events", **params)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == "invalid_request"


def test_report_parameters_are_checked(po_gateway, priya):
    assert get(po_gateway, priya, "/api/v1/audit/reports/patient-access").status_code == 400
    assert get(po_gateway, priya, "/api/v1/audit/reports/user-activity").status_code == 400
    assert get(po_gateway, priya, "/api/v1/audit/reports/everything").status_code == 400
    assert get(po_gateway, priya, "/api/v1/audit/reports/security", format="docx").status_code == 400


# --------------------------------------------------------------------------- access control and audit


ROUTES = [("GET", "/api/v1/audit/events"), ("GET", "/api/v1/audit/reports/patient-access?patient=PO-PAT-1"),
          ("GET", "/api/v1/audit/reports/disclosures?patient=PO-PAT-1"), ("GET", "/api/v1/audit/reports/security"),
          ("GET", "/api/v1/audit/reports/user-activity?user=alice"), ("GET", "/api/v1/audit/alerts"),
          ("POST", "/api/v1/audit/alerts/1")]


def test_a_researcher_gets_403_on_every_audit_route_and_each_is_a_security_alert(stack, po_gateway, po_audit):
    rob = {"Authorization": f"Bearer {stack.token('rob')}"}
    for method, path in ROUTES:
        resp = httpx.request(method, f"{po_gateway.url}{path}", headers=rob, timeout=30,
                             json={"status": "acknowledged"} if method == "POST" else None)
        assert resp.status_code == 403, (path, resp.text)
        assert resp.json()["error"] == "forbidden"
    alerts = po_audit.wait_for(len(ROUTES), event__id="110113", user__name="rob")
    assert len(alerts) == len(ROUTES)
    assert {a["event.type_codes"][0] for a in alerts} == {"110147"}
    assert po_audit.search(event__id="110101", user__name="rob") == []
    assert httpx.get(f"{po_gateway.url}/api/v1/audit/events", timeout=30).status_code == 401


def _query_detail(doc: dict) -> dict:
    root = etree.fromstring(doc["atna.xml"].encode())
    for detail in root.iter("ParticipantObjectDetail"):
        if detail.get("type") == "Query":
            return json.loads(base64.b64decode(detail.get("value")))
    raise AssertionError("no Query detail in the 110101 event")


def test_each_privacy_officer_query_is_a_110101_event(stack, po_gateway, po_audit):
    marker = f"MARK-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {stack.token('priya')}"}
    assert get(po_gateway, headers, "/api/v1/audit/events", patient=marker).status_code == 200
    assert get(po_gateway, headers, "/api/v1/audit/reports/patient-access", patient=marker).status_code == 200
    pdf = get(po_gateway, headers, "/api/v1/audit/reports/disclosures", patient=marker, format="pdf")
    assert pdf.status_code == 200
    assert get(po_gateway, headers, "/api/v1/audit/events", patient=marker, cursor="@@@").status_code == 400

    def mine() -> list[dict]:
        docs = po_audit.search(event__id="110101", user__name="priya")
        return [d for d in docs if marker in json.dumps(_query_detail(d))]

    # Shipping is asynchronous: wait (bounded) for delivery, then count.
    found: list[dict] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        httpx.post(f"{stack.es_url}/{po_gateway.index_prefix}-*/_refresh", timeout=30)
        found = mine()
        if len(found) >= 4:
            break
        time.sleep(0.3)
    assert len(found) == 4
    details = [_query_detail(d) for d in found]
    assert sorted(d.get("report", "search") for d in details) == ["disclosures", "patient-access", "search", "search"]
    assert sorted(d["event.outcome"] for d in found) == [0, 0, 0, 4]
    assert all(d["user.roles"] == ["privacy-officer"] and d["event.action"] == "R" for d in found)


# --------------------------------------------------------------------------- the CLI


def cli(gw, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**gw.env, "COMPLIANCE_DATABASE_URL": gw.database_url, "COMPLIANCE_AUDIT_INDEX_PREFIX": gw.index_prefix}
    return subprocess.run([sys.executable, "-m", "compliance.cli", "audit", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_report_through_the_gateway_with_a_token(stack, po_gateway, tmp_path):
    out_file = tmp_path / "disclosures.csv"
    out = cli(po_gateway, "report", "disclosures", "--patient", "PO-PAT-1", "--from", MARCH["from"], "--to",
              MARCH["to"], "--format", "csv", "--output", str(out_file), "--gateway", po_gateway.url,
              "--token", stack.token("priya"))
    assert out.returncode == 0, out.stderr
    lines = out_file.read_text().splitlines()
    assert lines[0].startswith("date,kind,recipient")
    assert [line.split(",")[1] for line in lines[1:]] == ["break-glass", "export", "re-identification"]
    refused = cli(po_gateway, "search", "--gateway", po_gateway.url, "--token", stack.token("rob"))
    assert refused.returncode == 1 and "403" in refused.stderr


def test_cli_search_as_a_local_operator_is_audited(stack, po_gateway, po_audit):
    import getpass

    out = cli(po_gateway, "search", "--patient", "PO-PAT-1", "--event-type", "110106", "--from", MARCH["from"],
              "--to", MARCH["to"])
    assert out.returncode == 0, out.stderr
    assert [e["event.uuid"] for e in json.loads(out.stdout)["events"]] == [uuid_of("export_p1_p2")]
    bad = cli(po_gateway, "search", "--outcome", "3")
    assert bad.returncode == 1 and "outcome must be one of" in bad.stderr
    operator = f"os:{getpass.getuser()}"
    docs = po_audit.wait_for(2, event__id="110101", user__id=operator)
    assert sorted(d["event.outcome"] for d in docs) == [0, 8]
    assert all(d["client.id"] == "compliance-cli" for d in docs)
