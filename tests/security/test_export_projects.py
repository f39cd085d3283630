"""Issue 12 item 7: a research export is requested only for a registered project the requester belongs to.

Before, the project was free text: rob (researcher, Keycloak group /research) could name another
team's project, inherit its pseudonym keys (his data linkable with theirs) and pass a destination's
``projects:`` restriction. Now the projects are registered in policies/projects.yaml with their
members (Keycloak groups, usernames). The demo registry has ``lung-ct`` (members: /research, rob's
group) and ``cardiac-outcomes`` (members: /departments/cardiology, which rob is not in).

A refusal is 403 JSON, the same for a project that exists and one that does not (a non-member learns
nothing about which projects exist), nothing is created, and a 110113 Security Alert is in
Elasticsearch; the steward sees the project's membership in the API and in ``compliance exports list``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import httpx
import pytest

from compliance.config import PROJECT_ROOT
from tests.integration.dicom_samples import unique_instance
from tests.security.conftest import AuditIndex, Gateway, Stack, bearer, start_gateway, stop_gateway

pytestmark = pytest.mark.integration

OWN = "lung-ct"                   # rob's project (members: group /research)
OTHER = "cardiac-outcomes"        # another team's (members: group /departments/cardiology)
PROTOCOL = "IRB-2026-042"         # lung-ct's registered protocol
PROJECT_URN = "urn:compliance:research-project:"


@pytest.fixture(scope="module")
def dana(stack: Stack) -> str:
    """A data steward's token."""
    return stack.token("dana")


def _body(project: str, purpose: str, **extra: object) -> dict:
    return {"project": project, "protocol": PROTOCOL, "purpose": purpose, "profile": "basic",
            "cohort": {"study_uids": ["1.2.826.0.1.3680043.8.498.1"]}, **extra}


def _requests_with(gw_url: str, token: str, purpose: str) -> list[dict]:
    """Every export request (the steward reads all) whose purpose is this test's unique marker."""
    resp = httpx.get(f"{gw_url}/api/v1/exports", headers=bearer(token), timeout=30)
    assert resp.status_code == 200, resp.text
    return [r for r in resp.json()["items"] if r["purpose"] == purpose]


def _refused_alerts(audit: AuditIndex, project: str) -> list[dict]:
    return audit.wait_for(1, event__id="110113", **{"user.name": "rob", "object.ids": PROJECT_URN + project})


def test_a_researcher_is_refused_a_project_he_is_not_a_member_of(gateway: Gateway, audit: AuditIndex,
                                                                  tokens: dict[str, str], dana: str) -> None:
    purpose = f"probe {uuid.uuid4().hex}"
    resp = httpx.post(f"{gateway.url}/api/v1/exports", headers=bearer(tokens["rob"]), timeout=30,
                      json=_body(OTHER, purpose))
    assert resp.status_code == 403, resp.text
    body = resp.json()
    assert body["error"] == "project_access_denied", body
    assert OTHER in body["message"] and "member" in body["message"]
    # nothing about the project itself: not its members, title or protocol
    assert "cardiology" not in resp.text.replace(OTHER, "") and "IRB" not in resp.text
    assert _requests_with(gateway.url, dana, purpose) == []
    alerts = _refused_alerts(audit, OTHER)
    assert len(alerts) == 1, alerts
    assert alerts[0]["event.outcome"] == 4 and "not a member" in json.dumps(alerts[0])


def test_an_unknown_project_is_refused_exactly_like_another_teams(gateway: Gateway, audit: AuditIndex,
                                                                   tokens: dict[str, str], dana: str) -> None:
    purpose = f"probe {uuid.uuid4().hex}"
    unknown = f"no-such-{uuid.uuid4().hex[:10]}"
    answers = {}
    for project in (unknown, OTHER):
        resp = httpx.post(f"{gateway.url}/api/v1/exports", headers=bearer(tokens["rob"]), timeout=30,
                          json=_body(project, purpose))
        answers[project] = (resp.status_code, resp.text.replace(project, "<project>"))
    # the same status and the same body, the project's name aside: whether a project exists is not disclosed
    assert answers[unknown] == answers[OTHER], answers
    assert answers[unknown][0] == 403
    assert _requests_with(gateway.url, dana, purpose) == []
    alerts = _refused_alerts(audit, unknown)
    assert len(alerts) == 1, alerts
    # the audit trail (read by privacy officers) says which it was
    assert "no registered project" in json.dumps(alerts[0])


def test_a_researcher_requests_for_his_own_project_and_the_steward_sees_its_membership(
        gateway: Gateway, tokens: dict[str, str], dana: str) -> None:
    purpose = f"own project {uuid.uuid4().hex}"
    sample = unique_instance("CT_small.dcm")
    resp = httpx.post(f"{gateway.url}/api/v1/exports", headers=bearer(tokens["rob"]), timeout=30,
                      json={**_body(OWN, purpose), "cohort": {"study_uids": [sample.study_uid]}})
    assert resp.status_code == 201, resp.text
    rid = resp.json()["id"]

    # The steward's view of the request: the registered project, its members, how the requester belongs.
    resp = httpx.get(f"{gateway.url}/api/v1/exports/{rid}", headers=bearer(dana), timeout=30)
    assert resp.status_code == 200, resp.text
    shown = resp.json()
    assert shown["project"] == OWN
    registration = shown["project_registration"]
    assert registration["registered"] is True and registration["title"]
    assert registration["members"] == {"groups": ["/research"], "users": []}
    assert registration["protocols"] == [PROTOCOL]
    assert shown["requester"] == {**shown["requester"], "username": "rob", "membership": "group /research"}

    # The same in the steward's CLI listing of the requests awaiting a decision.
    out = subprocess.run([sys.executable, "-m", "compliance.cli", "exports", "list", "--state", "requested",
                          "--token", dana, "--gateway", gateway.url],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    block = out.stdout[out.stdout.index(rid):]
    block = block[:block.index("\n\n")] if "\n\n" in block else block
    assert "rob (member by group /research)" in block, out.stdout
    assert "groups /research" in block and OWN in block and PROTOCOL in block

    # The researcher lists the projects he may request for: his own, not the other team's.
    resp = httpx.get(f"{gateway.url}/api/v1/exports/projects", headers=bearer(tokens["rob"]), timeout=30)
    assert resp.status_code == 200, resp.text
    assert [p["id"] for p in resp.json()["items"]] == [OWN]


def test_a_destination_restricted_to_a_project_refuses_any_other(stack: Stack, tmp_path, tokens) -> None:  # type: ignore[no-untyped-def]
    """A research archive for cardiac-outcomes only: rob (lung-ct) cannot reach it, whether he names
    cardiac-outcomes as his project (not a member: 403), spells it otherwise, or puts its name in every
    other field of a lung-ct request (400). Nothing is created; each refusal is audited."""
    destinations = tmp_path / "destinations.yaml"
    destinations.write_text("destinations:\n  cardiac-archive:\n    kind: dicomweb\n"
                            "    url: http://127.0.0.1:9/dicom-web\n    auth: none\n"
                            f"    projects: [{OTHER}]\n")
    prefix = f"test-audit-projects-{uuid.uuid4().hex[:8]}"
    from tests.integration.conftest import _reset_database, drop_prefix

    db = f"sqlite:///{tmp_path / 'projects.db'}"
    _reset_database(db)
    gw = start_gateway(stack, tmp_path, database_url=db, index_prefix=prefix, extra_env={
        "COMPLIANCE_EXPORTS_DESTINATIONS_FILE": str(destinations), "COMPLIANCE_EXPORTS_WORKER_BACKEND": "none"})
    audit = AuditIndex(stack.es_url, prefix)
    try:
        rob = tokens["rob"]
        # the destinations rob is shown: none of another project's, nor its name
        resp = httpx.get(f"{gw.url}/api/v1/exports/destinations", headers=bearer(rob), timeout=30)
        assert resp.status_code == 200 and [d["name"] for d in resp.json()["items"]] == ["bundle"], resp.text
        assert OTHER not in resp.text
        to_a = {"kind": "dicomweb", "name": "cardiac-archive"}
        claims_a = {"cohort": {"filters": {"StudyDescription": OTHER}}}
        attempts = [
            (_body(OTHER, "external validation", destination=to_a), 403),          # not a member
            (_body(OTHER.upper(), "external validation", destination=to_a), 403),  # another spelling: unknown
            (_body(OWN, OTHER, destination=to_a, **claims_a), 400),                # A's name everywhere else
            (_body(OWN, OTHER, destination={**to_a, "project": OTHER}), 400),      # ... even in the destination
        ]
        for body, status in attempts:
            resp = httpx.post(f"{gw.url}/api/v1/exports", headers=bearer(rob), json=body, timeout=30)
            assert resp.status_code == status, (body, resp.text)
            assert resp.headers["content-type"].startswith("application/json")
        steward = stack.token("dana")
        assert httpx.get(f"{gw.url}/api/v1/exports", headers=bearer(steward), timeout=30).json()["items"] == []
        listed = httpx.get(f"{gw.url}/api/v1/exports/destinations", headers=bearer(steward), timeout=30).json()
        assert [d["projects"] for d in listed["items"] if d["name"] == "cardiac-archive"] == [[OTHER]]
        # each refusal the service made is a 110113, naming the project asked for (the destination's too)
        for project in (OTHER, OTHER.upper()):
            assert len(audit.wait_for(1, event__id="110113", **{"user.name": "rob",
                                                                "object.ids": PROJECT_URN + project})) == 1
        refused = audit.wait_for(1, event__id="110113", **{"user.name": "rob", "object.ids": PROJECT_URN + OWN})
        assert len(refused) == 1 and "cardiac-archive" in json.dumps(refused[0]), refused
        # rob's own project still goes where it may (the bundle)
        resp = httpx.post(f"{gw.url}/api/v1/exports", headers=bearer(rob), json=_body(OWN, "method development"),
                          timeout=30)
        assert resp.status_code == 201, resp.text
    finally:
        stop_gateway(gw)
        drop_prefix(stack, prefix)
