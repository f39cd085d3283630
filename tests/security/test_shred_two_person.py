"""Issue 12 item 12: a crypto-shred needs two administrators, is refused under a legal hold, and is
audited at each step.

Before the fix one administrator erased a patient in one call (``POST /api/v1/keys/shred`` or
``compliance shred --patient ID``), legal hold or not. Now a shred is a request one administrator
asks for and a *different* one approves (``/api/v1/keys/shred-requests``, ``compliance shred ...``,
compliance/archive/shred.py draws the state machine); a patient named by a legal hold of the
retention policy (policies/retention.yaml ``legal_holds``) is refused at the request and again at
the approval; every step is a 110113 Security Alert on the trail. A refused shred changes nothing:
the patient's data key stays live and the objects read back byte for byte.

The demo realm has one administrator (ada); the second is created in Keycloak for this module only
(tests/integration/keycloak_admins.py) and deleted afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from compliance.config import PROJECT_ROOT
from tests.integration.conftest import _reset_database, drop_prefix
from tests.integration.dicom_samples import Sample, parts_of_multipart, unique_instance
from tests.integration.keycloak_admins import TemporaryUser, temporary_realm_user
from tests.integration.test_dicomweb_gateway import stow
from tests.integration.test_encrypted_storage import wado_instance

from .conftest import AuditIndex, Gateway, Stack, bearer, start_gateway, stop_gateway

pytestmark = pytest.mark.integration

REQUESTS = "/api/v1/keys/shred-requests"


@pytest.fixture(scope="module")
def second_admin(stack: Stack) -> Iterator[TemporaryUser]:
    with temporary_realm_user(stack, "shred-approver", "admin") as user:
        yield user


@pytest.fixture(scope="module")
def bob(stack: Stack, second_admin: TemporaryUser) -> str:
    """A token of the second administrator."""
    return stack.token(second_admin.username, second_admin.password)


def reads_back(gw: Gateway, token: str, s: Sample) -> bool:
    r = wado_instance(gw, token, s)
    return r.status_code == 200 and parts_of_multipart(r.content, r.headers["content-type"]) == [s.data]


def key_state(stack: Stack, patient_id: str) -> str:
    r = httpx.post(f"{stack.orthanc_url}/compliance/keys/state", json={"patient_id": patient_id},
                   auth=stack.orthanc_auth, timeout=30)
    r.raise_for_status()
    return str(r.json()["state"])


def stored(gw: Gateway, tokens: dict[str, str]) -> Sample:
    s = unique_instance()
    assert stow(gw, tokens["tom"], s).status_code == 200
    assert reads_back(gw, tokens["alice"], s)
    return s


def ask(gw: Gateway, token: str, patient_id: str, reason: str = "erasure request, GDPR art. 17") -> httpx.Response:
    return httpx.post(gw.url + REQUESTS, json={"patient_id": patient_id, "reason": reason}, headers=bearer(token),
                      timeout=60)


def decide(gw: Gateway, token: str, request_id: str, verb: str, comment: str = "checked") -> httpx.Response:
    return httpx.post(f"{gw.url}{REQUESTS}/{request_id}/{verb}", json={"comment": comment}, headers=bearer(token),
                      timeout=120)


def cli(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "compliance.cli", *args], env=gw.env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)


def alerts(audit: AuditIndex, expected: int, *, type_code: str, **terms: str) -> list[dict]:
    return audit.wait_for(expected, event__id="110113", event__type_codes=type_code, **terms)


def test_one_admin_alone_cannot_shred_through_any_entry_point(gateway, stack, tokens, audit: AuditIndex):
    s = stored(gateway, tokens)

    # the old one-call shred: the API route and the CLI command erase nothing
    r = httpx.post(f"{gateway.url}/api/v1/keys/shred", json={"patient_id": s.patient_id},
                   headers=bearer(tokens["ada"]), timeout=120)
    assert r.status_code in (404, 405), r.text
    assert cli(gateway, "shred", "--patient", s.patient_id).returncode != 0
    assert reads_back(gateway, tokens["alice"], s) and key_state(stack, s.patient_id) == "live"

    # ada asks, then approves her own request: refused (403), audited, the request still pending
    r = ask(gateway, tokens["ada"], s.patient_id)
    assert r.status_code == 201, r.text
    req = r.json()
    assert req["state"] == "requested" and req["patient_id"] == s.patient_id
    assert req["requested_by"]["username"] == "ada"
    r = decide(gateway, tokens["ada"], req["id"], "approve")
    assert r.status_code == 403 and r.json()["error"] == "self_approval_refused", r.text
    assert reads_back(gateway, tokens["alice"], s) and key_state(stack, s.patient_id) == "live"
    r = httpx.get(f"{gateway.url}{REQUESTS}/{req['id']}", headers=bearer(tokens["ada"]), timeout=30)
    assert r.status_code == 200 and r.json()["state"] == "requested" and r.json()["decided_by"] is None, r.text
    refused = alerts(audit, 1, type_code="110147", user__name="ada",
                     object__ids=f"urn:compliance:shred-request:{req['id']}")
    assert len(refused) == 1 and refused[0]["event.outcome"] == 4, refused
    assert "second, different administrator" in refused[0]["event.outcome_description"]

    # the operator on the host asks, and approves their own request through the CLI: refused as well
    out = cli(gateway, "shred", "request", "--patient", s.patient_id, "--reason", "duplicate record")
    assert out.returncode != 0 and "shred_request_state_conflict" in out.stderr, out.stderr  # one open request
    r = decide(gateway, tokens["ada"], req["id"], "reject", "withdrawn by the requester")
    assert r.status_code == 200 and r.json()["state"] == "rejected", r.text
    out = cli(gateway, "shred", "request", "--patient", s.patient_id, "--reason", "duplicate record")
    assert out.returncode == 0, out.stderr
    cli_req = json.loads(out.stdout)
    out = cli(gateway, "shred", "approve", cli_req["id"], "--comment", "me again")
    assert out.returncode != 0 and "self_approval_refused" in out.stderr, out.stderr
    assert reads_back(gateway, tokens["alice"], s) and key_state(stack, s.patient_id) == "live"
    r = decide(gateway, tokens["ada"], cli_req["id"], "reject", "not needed")
    assert r.status_code == 200 and r.json()["state"] == "rejected", r.text
    assert reads_back(gateway, tokens["alice"], s)


def test_the_cli_operator_cannot_pose_as_a_second_person(gateway, stack, tokens, audit: AuditIndex):
    """The CLI's operator is the operating-system account running it, not what USER/LOGNAME say."""
    s = stored(gateway, tokens)
    out = cli(gateway, "shred", "request", "--patient", s.patient_id, "--reason", "duplicate record")
    assert out.returncode == 0, out.stderr
    req = json.loads(out.stdout)
    posing = {**gateway.env, "USER": "mallory", "LOGNAME": "mallory", "LNAME": "mallory", "USERNAME": "mallory"}
    out = subprocess.run([sys.executable, "-m", "compliance.cli", "shred", "approve", req["id"], "--comment", "ok"],
                         env=posing, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "self_approval_refused" in out.stderr, out.stdout + out.stderr
    assert reads_back(gateway, tokens["alice"], s) and key_state(stack, s.patient_id) == "live"
    assert decide(gateway, tokens["ada"], req["id"], "reject", "test over").status_code == 200
    assert not audit.search(user__id="os:mallory"), "no event names the posed identity"


def test_a_second_admin_approves_and_the_patient_is_shredded(gateway, stack, tokens, bob, second_admin,
                                                             audit: AuditIndex):
    s = stored(gateway, tokens)
    other = stored(gateway, tokens)
    r = ask(gateway, tokens["ada"], s.patient_id, "patient asked for erasure, ticket 4711")
    assert r.status_code == 201, r.text
    req = r.json()

    # the second administrator sees it pending, with who asked and why
    r = httpx.get(gateway.url + REQUESTS, params={"state": "requested"}, headers=bearer(bob), timeout=30)
    assert r.status_code == 200, r.text
    pending = {x["id"]: x for x in r.json()["requests"]}
    assert pending[req["id"]]["reason"] == "patient asked for erasure, ticket 4711"
    assert pending[req["id"]]["requested_by"]["username"] == "ada"

    r = decide(gateway, bob, req["id"], "approve", "identity of the patient checked")
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["state"] == "shredded" and done["decided_by"]["username"] == second_admin.username
    assert done["shred"]["destroyed"] == 1 and done["shred"]["index_removed"] is True
    assert done["shred"]["studies"] == [s.study_uid]

    r = wado_instance(gateway, tokens["alice"], s)
    assert r.status_code == 410 and r.json()["error"] == "key_destroyed", r.text[:300]
    assert key_state(stack, s.patient_id) == "shredded"
    assert reads_back(gateway, tokens["alice"], other), "other patients are untouched"

    # a decided request cannot be decided again
    assert decide(gateway, tokens["ada"], req["id"], "reject").status_code == 409
    assert decide(gateway, bob, req["id"], "approve").status_code == 409

    # each step on the trail, in order: asked (ada), approved (the second admin), the attempt, the erasure
    urn = f"urn:compliance:shred-request:{req['id']}"
    steps = alerts(audit, 3, type_code="110129", object__ids=urn)
    by_user = [(d["user.name"], d["event.outcome_description"].split(":")[0]) for d in steps]
    assert by_user[:2] == [("ada", f"crypto-shred request {req['id']}"),
                           (second_admin.username, f"crypto-shred request {req['id']}")], by_user
    assert "asked" in steps[0]["event.outcome_description"] and s.patient_id in steps[0]["patient.ids"]
    assert "approved" in steps[1]["event.outcome_description"]
    deleted = audit.wait_for(1, event__id="110105", study__uids=s.study_uid)
    assert len(deleted) == 1, deleted
    assert deleted[0]["user.name"] == second_admin.username
    assert 'ParticipantObjectDataLifeCycle="15"' in deleted[0]["atna.xml"]
    assert req["id"] in deleted[0]["event.outcome_description"] and "ada" in deleted[0]["event.outcome_description"]
    assert steps[0]["chain.seq"] < steps[1]["chain.seq"] < deleted[0]["chain.seq"]


def test_a_rejected_request_changes_nothing(gateway, stack, tokens, bob, second_admin, audit: AuditIndex):
    s = stored(gateway, tokens)
    req = ask(gateway, tokens["ada"], s.patient_id).json()
    r = decide(gateway, bob, req["id"], "reject", "")
    assert r.status_code == 400, r.text  # a rejection says why
    r = decide(gateway, bob, req["id"], "reject", "the patient withdrew the request")
    assert r.status_code == 200 and r.json()["state"] == "rejected", r.text
    assert decide(gateway, tokens["ada"], req["id"], "approve").status_code in (403, 409)
    assert decide(gateway, bob, req["id"], "approve").status_code == 409
    assert reads_back(gateway, tokens["alice"], s) and key_state(stack, s.patient_id) == "live"
    rejected = alerts(audit, 1, type_code="110129", user__name=second_admin.username,
                      object__ids=f"urn:compliance:shred-request:{req['id']}")
    assert len(rejected) == 1 and "rejected" in rejected[0]["event.outcome_description"], rejected


def test_a_non_admin_can_neither_ask_nor_approve(gateway, stack, tokens, audit: AuditIndex):
    s = stored(gateway, tokens)
    req = ask(gateway, tokens["ada"], s.patient_id).json()
    for user in ("alice", "tom", "priya", "rob"):
        assert ask(gateway, tokens[user], s.patient_id).status_code == 403
        assert decide(gateway, tokens[user], req["id"], "approve").status_code == 403
        assert httpx.get(gateway.url + REQUESTS, headers=bearer(tokens[user]), timeout=30).status_code == 403
    assert reads_back(gateway, tokens["alice"], s) and key_state(stack, s.patient_id) == "live"
    r = httpx.get(f"{gateway.url}{REQUESTS}/{req['id']}", headers=bearer(tokens["ada"]), timeout=30)
    assert r.json()["state"] == "requested"
    denied = audit.wait_for(1, event__id="110113", event__type_codes="110147", user__name="tom",
                            event__outcome="4")
    assert any("approve a shred" in (d["event.outcome_description"] or "") for d in denied), denied
    assert decide(gateway, tokens["ada"], req["id"], "reject", "test over").status_code == 200


@pytest.fixture
def held_gateway(stack: Stack, tmp_path: Path) -> Iterator[tuple[Gateway, Path]]:
    """A gateway of its own whose retention policy file the test writes (read at every decision)."""
    policy = tmp_path / "retention.yaml"
    policy.write_text("audit_events_years: 6\nlegal_holds: []\n")
    prefix = f"test-hold-{uuid.uuid4().hex[:10]}"
    db = f"sqlite:///{tmp_path / 'hold.db'}"
    _reset_database(db)
    gw = start_gateway(stack, tmp_path, database_url=db, index_prefix=prefix,
                       extra_env={"COMPLIANCE_RETENTION_POLICY_FILE": str(policy)})
    try:
        yield gw, policy
    finally:
        stop_gateway(gw)
        drop_prefix(stack, prefix)


def test_a_patient_under_legal_hold_cannot_be_shredded(held_gateway, stack, tokens, bob, second_admin):
    gw, policy = held_gateway
    audit = AuditIndex(stack.es_url, gw.index_prefix)
    held, later = stored(gw, tokens), stored(gw, tokens)
    # asked before the hold, approved after it: the approval is refused, the request stays pending
    pending = ask(gw, tokens["ada"], later.patient_id)
    assert pending.status_code == 201, pending.text
    policy.write_text("audit_events_years: 6\nlegal_holds:\n  - id: LH-2026-014\n    reason: litigation\n"
                      f"    patient_ids: [\"{held.patient_id}\", \"{later.patient_id}\"]\n")

    r = ask(gw, tokens["ada"], held.patient_id)
    assert r.status_code == 409 and r.json()["error"] == "legal_hold", r.text
    assert "LH-2026-014" in r.json()["message"]
    listed = httpx.get(gw.url + REQUESTS, params={"state": "all"}, headers=bearer(tokens["ada"]), timeout=30).json()
    assert [x["patient_id"] for x in listed["requests"]] == [later.patient_id], "no request was created"

    r = decide(gw, bob, pending.json()["id"], "approve")
    assert r.status_code == 409 and r.json()["error"] == "legal_hold", r.text
    r = httpx.get(f"{gw.url}{REQUESTS}/{pending.json()['id']}", headers=bearer(bob), timeout=30)
    assert r.json()["state"] == "requested"

    for s in (held, later):
        assert reads_back(gw, tokens["alice"], s) and key_state(stack, s.patient_id) == "live"
    out = cli(gw, "shred", "request", "--patient", held.patient_id, "--reason", "x")
    assert out.returncode != 0 and "legal_hold" in out.stderr, out.stderr

    refusals = alerts(audit, 3, type_code="110147", event__outcome="4")
    about = {(d["user.name"], tuple(d["patient.ids"])) for d in refusals
             if "legal hold LH-2026-014" in (d["event.outcome_description"] or "")}
    assert ("ada", (held.patient_id,)) in about, refusals
    assert (second_admin.username, (later.patient_id,)) in about, refusals
