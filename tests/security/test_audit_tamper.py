"""Tampering with the audit trail in Elasticsearch (issue 12 item 4), against the real cluster.

Someone with write access to Elasticsearch (but not to the gateway's database) edits the newest events,
those after the last signed checkpoint, and re-chains them: recomputes ``chain.prev``/``chain.hash`` so
that the chain in Elasticsearch is consistent in itself. ``compliance audit verify`` compared the
repository with the outbox by count only and said "intact"; it must name each rewritten event (position
and event id) and exit non-zero.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime

import httpx
import pytest

from compliance.audit.atna import AuditSource
from compliance.audit.chain import GENESIS, HASH, PREV, link_hash, verify_chain
from compliance.audit.checkpoints import generate_key_file
from compliance.audit.codes import Outcome
from compliance.audit.events import query_event
from compliance.audit.message import PatientRef, UserRef
from compliance.audit.outbox import SqlAuditOutbox
from compliance.audit.recorder import AuditRecorder
from compliance.config import PROJECT_ROOT
from compliance.db.session import make_engine
from tests.integration.conftest import private_trail

from .conftest import Stack

pytestmark = pytest.mark.integration


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "compliance.cli", "audit", *args], cwd=PROJECT_ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert "Traceback" not in out.stderr, out.stderr
    return out


def record_queries(env: dict[str, str], first: int, count: int) -> None:
    """Queries as the gateway records them (110112, a clinician, one patient each), into the trail's outbox."""
    engine = make_engine(env["COMPLIANCE_DATABASE_URL"])
    outbox = SqlAuditOutbox(engine)
    recorder = AuditRecorder(outbox, AuditSource(source_id="compliance-gateway", enterprise_site_id="tamper-test"))
    user = UserRef(user_id="sub-alice", username="alice", client_id="compliance-cli", roles=("clinician",),
                   source_address="10.1.2.3")
    try:
        for i in range(first, first + count):
            recorder.record_now(query_event(user=user, gateway_id="compliance-gateway", outcome=Outcome.SUCCESS,
                                            query=f"PatientID=TAMPER-{i}".encode(), sop_class_uid=None,
                                            patients=[PatientRef(f"TAMPER-{i}", f"DOE^JANE{i}")],
                                            resource="/dicom-web/studies", occurred_at=datetime.now(UTC)))
    finally:
        outbox.close()
        engine.dispose()


def findings(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_a_rewritten_and_rechained_tail_after_the_last_checkpoint_is_named(stack: Stack, tmp_path):
    with private_trail(stack, tmp_path, "tamper", {}) as (env, prefix, _):
        key = tmp_path / "checkpoint.pem"
        generate_key_file(key)
        # checkpoints only when asked (compliance audit checkpoint), so the tail stays unsigned
        env = {**env, "COMPLIANCE_AUDIT_CHECKPOINT_KEY_FILE": str(key),
               "COMPLIANCE_AUDIT_CHECKPOINT_EVERY_EVENTS": "1000000",
               "COMPLIANCE_AUDIT_CHECKPOINT_EVERY_SECONDS": "86400"}
        record_queries(env, 1, 8)
        assert cli(env, "ship").returncode == 0
        signed = cli(env, "checkpoint")
        assert signed.returncode == 0, signed.stderr
        seq_to = json.loads(signed.stdout)["seq_to"]
        record_queries(env, 9, 6)
        shipped = cli(env, "ship")
        assert shipped.returncode == 0 and json.loads(shipped.stdout)["shipped"] >= 6, shipped.stdout
        before = cli(env, "verify")
        assert before.returncode == 0 and before.stdout.startswith("intact:"), before.stdout + before.stderr

        # the attack: the three newest events, all after the signed checkpoint, edited and re-chained
        httpx.post(f"{stack.es_url}/{prefix}-*/_refresh", timeout=30).raise_for_status()
        hits = httpx.post(f"{stack.es_url}/{prefix}-*/_search", timeout=30, json={
            "size": 1000, "sort": [{"chain.seq": "asc"}], "query": {"exists": {"field": "chain.seq"}}},
        ).json()["hits"]["hits"]
        docs = [(h["_index"], h["_id"], h["_source"]) for h in hits]
        edited = docs[-3:]
        assert edited[0][2]["chain.seq"] > seq_to  # nothing a signed checkpoint covers is touched
        prev = docs[-4][2][HASH]
        for index, _id, src in edited:
            src["user.name"] = "mallory"
            src["patient.ids"] = ["SOMEONE-ELSE"]
            src["patient.names"] = ["ELSE^SOME"]
            src[PREV] = prev
            src[HASH] = prev = link_hash(prev, src)
            httpx.put(f"{stack.es_url}/{index}/_doc/{_id}", json=src, timeout=30).raise_for_status()
        httpx.post(f"{stack.es_url}/{prefix}-*/_refresh", timeout=30).raise_for_status()
        # the chain in Elasticsearch is consistent in itself: only the outbox can tell
        assert verify_chain([src for _, _, src in docs], start_prev=GENESIS, expected_first_seq=1).intact

        after = cli(env, "verify")
        assert after.returncode == 1, after.stdout + after.stderr
        first = edited[0][2]
        broken = f"BROKEN at seq {first['chain.seq']} (rewritten, event {first['event.uuid']})"
        assert after.stdout.startswith(broken), after.stdout
        named = {(f["kind"], f["seq"], f["event"]) for f in findings(after.stdout)}
        assert named == {("rewritten", src["chain.seq"], src["event.uuid"]) for _, _, src in edited}, after.stdout
        assert all("differs from the outbox's record" in f["detail"] for f in findings(after.stdout))
