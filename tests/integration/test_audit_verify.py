"""Tamper evidence on the real Elasticsearch: `compliance audit verify` names each kind of tampering."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import httpx
import pytest

from compliance.config import PROJECT_ROOT

from .conftest import AuditIndex, Stack, _reset_database, drop_prefix, start_gateway, stop_gateway

pytestmark = pytest.mark.integration




@pytest.fixture(scope="module")
def own_gateway(stack: Stack, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify")
    prefix = f"test-verify-{uuid.uuid4().hex[:10]}"
    db = f"sqlite:///{tmp / 'verify.db'}"
    _reset_database(db)
    gw = start_gateway(stack, tmp, database_url=db, index_prefix=prefix)
    yield gw
    stop_gateway(gw)
    drop_prefix(stack, prefix)


def verify(gw) -> tuple[int, str]:
    env = {**gw.env, "COMPLIANCE_DATABASE_URL": gw.database_url, "COMPLIANCE_AUDIT_INDEX_PREFIX": gw.index_prefix}
    out = subprocess.run([sys.executable, "-m", "compliance.cli", "audit", "verify"], cwd=PROJECT_ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, out.stdout


def findings(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_verify_names_modified_deleted_inserted_and_reordered_events(stack: Stack, own_gateway):
    gw = own_gateway
    token = stack.token("alice")
    for i in range(12):
        r = httpx.get(f"{gw.url}/dicom-web/studies", params={"PatientID": f"VERIFY-{i}"},
                      headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code in (200, 204)
    audit = AuditIndex(stack.es_url, gw.index_prefix)
    docs = audit.wait_for(12, **{"event.id": "110112"})
    assert len(docs) == 12
    code, out = verify(gw)
    assert code == 0, out
    assert out.startswith("intact:")

    by_seq = {d["chain.seq"]: d for d in audit.search()}
    index = f"{gw.index_prefix}-*"

    def target(seq: int) -> tuple[str, str]:
        hit = httpx.post(f"{stack.es_url}/{index}/_search", json={"query": {"term": {"chain.seq": seq}}},
                         timeout=30).json()["hits"]["hits"][0]
        return hit["_index"], hit["_id"]

    # modify one event, delete another, swap the positions of two more, insert a forged one
    idx, _id = target(4)
    httpx.post(f"{stack.es_url}/{idx}/_update/{_id}", json={"doc": {"user.name": "mallory"}},
               params={"refresh": "true"}, timeout=30).raise_for_status()
    idx, _id = target(6)
    httpx.delete(f"{stack.es_url}/{idx}/_doc/{_id}", params={"refresh": "true"}, timeout=30).raise_for_status()
    (i8, id8), (i10, id10) = target(8), target(10)
    httpx.post(f"{stack.es_url}/{i8}/_update/{id8}", json={"doc": {"chain.seq": 10}}, timeout=30).raise_for_status()
    httpx.post(f"{stack.es_url}/{i10}/_update/{id10}", json={"doc": {"chain.seq": 8}},
               params={"refresh": "true"}, timeout=30).raise_for_status()
    forged = dict(by_seq[3])
    forged.pop("_id", None)
    forged.update({"event.uuid": "00000000-forged", "user.name": "mallory"})
    for key in ("chain.seq", "chain.prev", "chain.hash"):
        forged.pop(key)
    httpx.put(f"{stack.es_url}/{i8}/_doc/00000000-forged", json=forged, params={"refresh": "true"},
              timeout=30).raise_for_status()

    code, out = verify(gw)
    assert code == 1
    assert out.startswith("BROKEN at seq")
    named = {(f["kind"], f["seq"]) for f in findings(out)}
    assert ("modified", 4) in named, out
    assert ("deleted", 6) in named, out
    assert ("reordered", 8) in named and ("reordered", 10) in named, out
    assert ("inserted", None) in named, out
    # the verification itself is an audited read of the audit trail
    used = audit.wait_for(2, **{"event.id": "110101"})
    assert len(used) >= 2


def test_verify_refuses_clearly_when_elasticsearch_is_unreachable(own_gateway):
    env = {**own_gateway.env, "COMPLIANCE_DATABASE_URL": own_gateway.database_url,
           "COMPLIANCE_ELASTICSEARCH_URL": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-m", "compliance.cli", "audit", "verify"], cwd=PROJECT_ROOT,
                         env={k: v for k, v in env.items() if k != "PYTHONPATH"} | {"PATH": os.environ["PATH"]},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "cannot read the audit repository" in out.stderr


def test_signed_checkpoints_catch_a_consistently_rechained_repository(stack: Stack, tmp_path):
    """Someone with write access to Elasticsearch edits an event and recomputes every later link."""
    from compliance.audit.chain import HASH, PREV, link_hash

    prefix = f"test-verifycp-{uuid.uuid4().hex[:10]}"
    db = f"sqlite:///{tmp_path / 'cp.db'}"
    _reset_database(db)
    gw = start_gateway(stack, tmp_path, database_url=db, index_prefix=prefix)
    env = {**gw.env, "COMPLIANCE_DATABASE_URL": db, "COMPLIANCE_AUDIT_INDEX_PREFIX": prefix}
    try:
        token = stack.token("alice")
        for i in range(10):
            httpx.get(f"{gw.url}/dicom-web/studies", params={"PatientID": f"CP-{i}"},
                      headers={"Authorization": f"Bearer {token}"}, timeout=30)
        audit = AuditIndex(stack.es_url, prefix)
        assert len(audit.wait_for(10, **{"event.id": "110112"})) == 10
        out = subprocess.run([sys.executable, "-m", "compliance.cli", "audit", "checkpoint"], cwd=PROJECT_ROOT,
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        signed = json.loads(out.stdout)
        assert signed["seq_from"] == 1 and signed["seq_to"] >= 11
        # the signed checkpoint is in the repository too
        httpx.post(f"{stack.es_url}/{prefix}.checkpoints/_refresh", timeout=30)
        r = httpx.get(f"{stack.es_url}/{prefix}.checkpoints/_search", timeout=30).json()
        assert r["hits"]["total"]["value"] >= 1
        code, text = verify(gw)
        assert code == 0, text
        assert "signed checkpoint(s) verified" in text and " 0 signed" not in text, text

        hits = httpx.post(f"{stack.es_url}/{prefix}-*/_search", timeout=30,
                          json={"size": 1000, "sort": [{"chain.seq": "asc"}],
                                "query": {"range": {"chain.seq": {"lte": signed["seq_to"]}}}}).json()["hits"]["hits"]
        docs = [(h["_index"], h["_id"], h["_source"]) for h in hits]
        _, _, fifth = docs[4]
        fifth["user.name"] = "mallory"
        prev = docs[3][2][HASH]
        for idx, _id, src in docs[4:]:
            src[PREV] = prev
            src[HASH] = prev = link_hash(prev, src)
            httpx.put(f"{stack.es_url}/{idx}/_doc/{_id}", json=src, timeout=30).raise_for_status()
        httpx.post(f"{stack.es_url}/{prefix}-*/_refresh", timeout=30)
        code, text = verify(gw)
        assert code == 1, text
        kinds = {(f["kind"], f["seq"]) for f in findings(text)}
        assert ("checkpoint", 1) in kinds, text
        # the re-chained range itself is internally consistent: only the checkpoint can tell
        assert not any(k == "modified" and s is not None and s <= signed["seq_to"] for k, s in kinds), text
    finally:
        stop_gateway(gw)
        drop_prefix(stack, prefix)
