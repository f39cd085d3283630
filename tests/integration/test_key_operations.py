"""Key operations on the real stack: rotate, rewrap, destroy the old KEK, shred a patient (asked by
one administrator, approved by a second one, created in Keycloak for this module).

Orthanc (with the storage plugin) and the gateway are restarted in between; every assertion is on
what the gateway returns, on the key store's state, on the bytes on disk, or on the audit documents.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from compliance.config import PROJECT_ROOT, load_settings
from compliance.crypto.streaming import read_header

from .conftest import AuditIndex, Gateway, Stack, dump, start_gateway, stop_gateway
from .dicom_samples import Sample, parts_of_multipart, unique_instance
from .keycloak_admins import TemporaryUser, temporary_realm_user
from .test_dicomweb_gateway import bearer, stow
from .test_encrypted_storage import attachment_path, wado_instance

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def second_admin(stack: Stack) -> Iterator[TemporaryUser]:
    with temporary_realm_user(stack, "key-ops-admin", "admin") as user:
        yield user


@pytest.fixture(scope="module")
def tokens(stack: Stack, second_admin: TemporaryUser) -> dict[str, str]:
    return {**{u: stack.token(u) for u in ("alice", "tom", "ada")},
            "admin2": stack.token(second_admin.username, second_admin.password)}


def restart_orthanc() -> None:
    for cmd in ("down", "up"):
        subprocess.run([str(PROJECT_ROOT / "deploy/local" / cmd), "orthanc"], check=True, capture_output=True,
                       timeout=180)


def reads_back(gw: Gateway, token: str, s: Sample) -> bool:
    r = wado_instance(gw, token, s)
    return r.status_code == 200 and parts_of_multipart(r.content, r.headers["content-type"]) == [s.data]


def keys_status(gw: Gateway, token: str) -> dict:
    r = httpx.get(f"{gw.url}/api/v1/keys/status", headers=bearer(token), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def cli(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "compliance.cli", *args], env=gw.env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_only_admins_operate_keys(gateway, tokens, audit: AuditIndex):
    for method, path in [("GET", "/api/v1/keys/status"), ("POST", "/api/v1/keys/rotate"),
                         ("POST", "/api/v1/keys/shred-requests")]:
        r = httpx.request(method, gateway.url + path, headers=bearer(tokens["alice"]), timeout=30,
                          json={"patient_id": "SOMEONE", "reason": "x"} if path.endswith("requests") else None)
        assert r.status_code == 403, r.text
    assert keys_status(gateway, tokens["ada"])["keks"]


def test_rotate_rewrap_destroy_with_restarts_everything_still_reads(gateway, stack, tokens, tmp_path,
                                                                    audit: AuditIndex):
    before = unique_instance()
    assert stow(gateway, tokens["tom"], before).status_code == 200
    old_active = next(k["id"] for k in keys_status(gateway, tokens["ada"])["keks"] if k["state"] == "active")

    r = httpx.post(f"{gateway.url}/api/v1/keys/rotate", headers=bearer(tokens["ada"]), timeout=60)
    assert r.status_code == 200, r.text
    new_active = r.json()["active_kek_id"]
    assert new_active != old_active
    after = unique_instance("MR_small.dcm")
    assert stow(gateway, tokens["tom"], after).status_code == 200
    status = keys_status(gateway, tokens["ada"])
    states = {k["id"]: k for k in status["keks"]}
    assert states[old_active]["state"] == "retired" and states[old_active]["data_keys"] >= 1
    assert states[new_active]["state"] == "active" and states[new_active]["data_keys"] >= 1

    restart_orthanc()
    stop_gateway(gateway)
    gw = start_gateway(stack, tmp_path, database_url=gateway.database_url, index_prefix=gateway.index_prefix)
    try:
        assert reads_back(gw, tokens["alice"], before) and reads_back(gw, tokens["alice"], after)

        # rewrap through the CLI (the operator on the host), then destroy the old KEK through the API
        out = cli(gw, "keys", "rewrap")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["active_kek_id"] == new_active
        r = httpx.post(f"{gw.url}/api/v1/keys/{old_active}/destroy", headers=bearer(tokens["ada"]), timeout=60)
        assert r.status_code == 200, r.text
        status = keys_status(gw, tokens["ada"])
        old = next(k for k in status["keks"] if k["id"] == old_active)
        assert old["state"] == "destroyed" and old["in_provider"] is False and old["data_keys"] == 0
        assert old_active not in status["provider"]["kek_ids"]

        restart_orthanc()
        stop_gateway(gw)
        gw = start_gateway(stack, tmp_path, database_url=gateway.database_url, index_prefix=gateway.index_prefix)
        assert reads_back(gw, tokens["alice"], before) and reads_back(gw, tokens["alice"], after)

        # destroying the active KEK is refused (409) and audited as a failed security configuration
        r = httpx.post(f"{gw.url}/api/v1/keys/{new_active}/destroy", headers=bearer(tokens["ada"]), timeout=60)
        assert r.status_code == 409, r.text
    finally:
        stop_gateway(gw)
        # the session's gateway fixture is restarted for the tests that follow
        restarted = start_gateway(stack, tmp_path, database_url=gateway.database_url,
                                  index_prefix=gateway.index_prefix)
        gateway.url, gateway.process, gateway.log_path = restarted.url, restarted.process, restarted.log_path
    events = audit.wait_for(5, event__id="110113", user__name="ada")
    descriptions = [e.get("event.outcome_description") or "" for e in events]
    for op in ("archive keys rotate", f"archive keys destroy {old_active}"):
        assert any(d.startswith(op) for d in descriptions), dump(descriptions)
    os_user = audit.wait_for(1, event__id="110113", client__id="compliance-cli")
    assert any((e.get("event.outcome_description") or "").startswith("archive keys rewrap") for e in os_user), \
        dump(os_user)


def shred(gw: Gateway, tokens: dict[str, str], patient_id: str) -> httpx.Response:
    """ada asks, the second administrator approves: the answer of the approval (the shred ran)."""
    r = httpx.post(f"{gw.url}/api/v1/keys/shred-requests", json={"patient_id": patient_id, "reason": "test"},
                   headers=bearer(tokens["ada"]), timeout=30)
    assert r.status_code == 201, r.text
    return httpx.post(f"{gw.url}/api/v1/keys/shred-requests/{r.json()['id']}/approve", json={},
                      headers=bearer(tokens["admin2"]), timeout=120)


def qido(gw: Gateway, token: str, **params: str) -> list[dict]:
    r = httpx.get(f"{gw.url}/dicom-web/studies", params=params, headers=bearer(token), timeout=30)
    assert r.status_code in (200, 204), r.text
    return r.json() if r.content else []


def test_shred_makes_the_patient_gone_and_undecryptable(gateway, stack, tokens, second_admin, audit: AuditIndex):
    s = unique_instance()
    other = unique_instance("MR_small.dcm")
    for x in (s, other):
        assert stow(gateway, tokens["tom"], x).status_code == 200
    assert qido(gateway, tokens["alice"], PatientID=s.patient_id), "found before the shred"
    path = attachment_path(stack, s)
    stored = path.read_bytes()  # what a backup taken before the shred holds
    key_id = read_header(stored[:1024]).key_id

    # bad input changes nothing: no body, an empty id, no reason, an unknown field
    for body in (None, {"patient_id": "", "reason": "x"}, {"patient_id": s.patient_id},
                 {"patient_id": s.patient_id, "reason": "x", "force": True}):
        r = httpx.post(f"{gateway.url}/api/v1/keys/shred-requests", json=body, headers=bearer(tokens["ada"]),
                       timeout=30)
        assert r.status_code in (400, 422) and r.json()["error"], r.text
    assert reads_back(gateway, tokens["alice"], s)

    r = shred(gateway, tokens, s.patient_id)
    assert r.status_code == 200, r.text
    done = r.json()["shred"]
    assert done["destroyed"] == 1 and done["state"] == "shredded" and done["index_removed"] is True
    assert done["studies"] == [s.study_uid] and r.json()["state"] == "shredded"

    r = wado_instance(gateway, tokens["alice"], s)
    assert r.status_code == 410, r.text[:500]
    body = r.json()
    assert body["error"] == "key_destroyed" and body["detail"]["study_uid"] == s.study_uid
    assert s.data[132:400] not in r.content
    assert reads_back(gateway, tokens["alice"], other), "other patients are untouched"

    # searches no longer know the patient: not by id, and not in a search over everything
    assert qido(gateway, tokens["alice"], PatientID=s.patient_id) == []
    everything = httpx.get(f"{gateway.url}/dicom-web/studies", params={"limit": "1000"},
                           headers=bearer(tokens["alice"]), timeout=30)
    assert everything.status_code in (200, 204)
    assert s.patient_id.encode() not in everything.content and s.study_uid.encode() not in everything.content
    assert httpx.post(f"{stack.orthanc_url}/tools/lookup", content=s.patient_id, auth=stack.orthanc_auth,
                      timeout=30).json() == []

    # the key is gone from the key store; the stored file went with the index entry, and its bytes
    # (as a backup taken before the shred holds them) can no longer be decrypted by anyone
    keys_db = load_settings().archive_keys_dir / "keys.db"
    with contextlib.closing(sqlite3.connect(f"file:{keys_db}?mode=ro", uri=True)) as db:
        wrapped, destroyed_at = db.execute(
            "SELECT wrapped_key, destroyed_at FROM crypto_data_key WHERE id = ?", (key_id,)).fetchall()[0]
    assert wrapped is None and destroyed_at is not None
    assert not path.exists()
    # The archive runs under its own account: directories this test creates for the restored copy are
    # handed to that account and removed afterwards, so the archive can always write its own files there.
    created = [d for d in (path.parent.parent, path.parent) if not d.exists()]
    owner = path.parent.parent.parent.stat()
    path.parent.mkdir(parents=True, exist_ok=True)
    for d in created:
        os.chown(d, owner.st_uid, owner.st_gid)
    path.write_bytes(stored)
    try:
        verify = httpx.post(f"{stack.orthanc_url}/compliance/archive/verify", auth=stack.orthanc_auth, timeout=30,
                            json={"attachments": [{"instance": "x", "uuid": path.name, "content_type": 1}]}).json()
    finally:
        path.unlink()
        for d in reversed(created):
            with contextlib.suppress(OSError):  # the archive may have stored a file there meanwhile
                d.rmdir()
    assert [f["result"] for f in verify["failures"]] == ["key_destroyed"]

    # audited twice: the attempt before anything was destroyed, then the permanent erasure
    deleted = audit.wait_for(1, event__id="110105", study__uids=s.study_uid)
    assert len(deleted) == 1, dump(deleted)
    assert 'ParticipantObjectDataLifeCycle="15"' in deleted[0]["atna.xml"]
    assert deleted[0]["user.name"] == second_admin.username and s.patient_id in deleted[0]["patient.ids"]
    assert "removed from the archive index: yes" in deleted[0]["event.outcome_description"]
    attempts = audit.wait_for(1, event__id="110113", study__uids=s.study_uid)
    assert len(attempts) == 1, dump(attempts)
    assert "executing" in attempts[0]["event.outcome_description"]
    assert f"asked by ada, approved by {second_admin.username}" in attempts[0]["event.outcome_description"]
    assert attempts[0]["chain.seq"] < deleted[0]["chain.seq"], "the attempt is recorded first"

    # shredding again is harmless: nothing left to destroy, nothing in the index
    r = shred(gateway, tokens, s.patient_id)
    assert r.status_code == 200, r.text
    assert r.json()["shred"]["destroyed"] == 0 and r.json()["shred"]["state"] == "shredded", r.text
    assert wado_instance(gateway, tokens["alice"], s).status_code == 410


def test_cli_shred_and_status(gateway, stack, tokens, audit: AuditIndex):
    """The operator on the host asks through the CLI; ada approves through the API."""
    s = unique_instance()
    assert stow(gateway, tokens["tom"], s).status_code == 200
    out = cli(gateway, "shred", "request", "--patient", s.patient_id, "--reason", "duplicate record")
    assert out.returncode == 0, out.stderr
    request_id = json.loads(out.stdout)["id"]
    out = cli(gateway, "shred", "list")
    assert out.returncode == 0 and request_id in [x["id"] for x in json.loads(out.stdout)["requests"]], out.stderr
    assert reads_back(gateway, tokens["alice"], s), "asking destroys nothing"
    r = httpx.post(f"{gateway.url}/api/v1/keys/shred-requests/{request_id}/approve", json={"comment": "ok"},
                   headers=bearer(tokens["ada"]), timeout=120)
    assert r.status_code == 200 and r.json()["shred"]["destroyed"] == 1, r.text
    out = cli(gateway, "shred", "show", request_id)
    assert out.returncode == 0 and json.loads(out.stdout)["state"] == "shredded", out.stderr
    assert wado_instance(gateway, tokens["alice"], s).status_code == 410
    out = cli(gateway, "keys", "status")
    assert out.returncode == 0, out.stderr
    assert any(k["state"] == "active" for k in json.loads(out.stdout)["keks"])
    deleted = audit.wait_for(1, event__id="110105", study__uids=s.study_uid)
    assert len(deleted) == 1 and deleted[0]["user.name"] == "ada"
    steps = audit.wait_for(2, event__id="110113", event__type_codes="110129",
                           object__ids=f"urn:compliance:shred-request:{request_id}")
    assert [d["user.id"] for d in steps[:2]] == [f"os:{getpass.getuser()}", deleted[0]["user.id"]], dump(steps)
    assert f"asked by {getpass.getuser()}" in steps[0]["event.outcome_description"]
    assert "approved by ada" in steps[1]["event.outcome_description"]
    assert qido(gateway, tokens["alice"], PatientID=s.patient_id) == []
