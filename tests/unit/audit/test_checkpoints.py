"""Signed checkpoints: RFC 6962 Merkle roots, Ed25519 signatures, periodic signing on a real outbox."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from datetime import UTC, datetime

import pytest

from compliance.audit.chain import GENESIS, HASH, PREV, SEQ, extend, link_hash, verify_chain
from compliance.audit.checkpoints import (
    AuditCheckpointer,
    CheckpointSigner,
    SqlCheckpointStore,
    generate_key_file,
    load_public_key,
    merkle_root,
    merkle_root_recursive,
)
from compliance.audit.outbox import OutboxEntry, SqlAuditOutbox
from compliance.audit.verify import CheckpointTap
from compliance.db.migrate import upgrade
from compliance.db.session import make_engine
from compliance.errors import ConfigurationError


def test_merkle_root_of_nothing_is_the_hash_of_nothing():
    # RFC 6962 2.1: MTH({}) = SHA-256()
    assert merkle_root([]).hex() == hashlib.sha256(b"").hexdigest()


def test_merkle_root_of_one_and_two_leaves_follow_rfc6962():
    a, b = b"a" * 32, b"b" * 32
    la, lb = hashlib.sha256(b"\x00" + a).digest(), hashlib.sha256(b"\x00" + b).digest()
    assert merkle_root([a]) == la
    assert merkle_root([a, b]) == hashlib.sha256(b"\x01" + la + lb).digest()


@pytest.mark.parametrize("n", [*range(1, 34), 100, 1000, 1025])
def test_iterative_root_equals_the_rfc_definition(n):
    leaves = [hashlib.sha256(str(i).encode()).digest() for i in range(n)]
    assert merkle_root(leaves) == merkle_root_recursive(leaves)


def test_three_leaves_split_at_two():
    leaves = [bytes([i]) * 32 for i in range(3)]
    h = [hashlib.sha256(b"\x00" + x).digest() for x in leaves]
    left = hashlib.sha256(b"\x01" + h[0] + h[1]).digest()
    assert merkle_root(leaves) == hashlib.sha256(b"\x01" + left + h[2]).digest()


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "k.pem"
    generate_key_file(path)
    return path


def test_generated_key_is_private_to_its_owner_and_never_overwritten(key_file):
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        generate_key_file(key_file)


def test_a_key_readable_by_others_is_refused(key_file):
    os.chmod(key_file, 0o644)
    with pytest.raises(ConfigurationError, match="readable by others"):
        CheckpointSigner.from_file(key_file)


def test_signature_verifies_and_any_change_breaks_it(key_file):
    signer = CheckpointSigner.from_file(key_file)
    leaves = [hashlib.sha256(str(i).encode()).digest() for i in range(10)]
    cp = signer.sign(1, 10, leaves, created_at=datetime(2026, 11, 28, tzinfo=UTC))
    public = load_public_key(key_file)
    assert cp.verify_signature(public)
    assert cp.head_hash == leaves[-1].hex()
    from dataclasses import replace

    assert not replace(cp, seq_to=11).verify_signature(public)
    assert not replace(cp, merkle_root="0" * 64).verify_signature(public)
    other = CheckpointSigner.from_file(key_file)  # same key: same key id
    assert other.key_id == signer.key_id


def _entries(start: int, n: int) -> list[OutboxEntry]:
    return [OutboxEntry(uuid=f"00000000-0000-0000-0000-{i:012d}", event_code="110112",
                        occurred_at=datetime(2026, 11, 28, tzinfo=UTC),
                        document={"event.uuid": f"00000000-0000-0000-0000-{i:012d}", "n": i})
            for i in range(start, start + n)]


def test_checkpointer_signs_consecutive_ranges_when_due(tmp_path, key_file):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    upgrade(url)
    engine = make_engine(url)
    outbox = SqlAuditOutbox(engine)
    published: list = []
    ticks = iter(range(0, 10_000, 1))
    clock = lambda: float(next(ticks))  # noqa: E731 - an injected clock advancing one second per read
    cp = AuditCheckpointer(SqlCheckpointStore(engine), CheckpointSigner.from_file(key_file),
                           publish=published.extend, every_events=100, every_seconds=1e9, clock=clock)
    outbox.append_now(_entries(1, 99))
    assert cp.maybe_checkpoint() is None  # 99 < 100 and not yet time
    outbox.append_now(_entries(100, 150))
    first = cp.maybe_checkpoint()
    assert (first.seq_from, first.seq_to) == (1, 249)
    outbox.append_now(_entries(250, 5))
    second = cp.maybe_checkpoint(force=True)
    assert (second.seq_from, second.seq_to) == (250, 254)
    # the root is over the outbox's chain hashes, in order
    with engine.connect() as conn:
        hashes = [bytes.fromhex(r[0]) for r in conn.exec_driver_sql("select hash from audit_outbox order by seq")]
    assert first.merkle_root == merkle_root(hashes[:249]).hex()
    assert cp.publish_pending() == 2 and [c.seq_from for c in published] == [1, 250]
    assert cp.publish_pending() == 0
    # a second process racing for the same range cannot sign it twice
    rival = AuditCheckpointer(SqlCheckpointStore(engine), CheckpointSigner.from_file(key_file), every_events=1)
    assert rival.maybe_checkpoint() is None
    assert SqlCheckpointStore(engine).count() == 2
    outbox.close()


def _chain(n: int) -> list[dict]:
    docs = [{"event.uuid": f"u{i}", "user.name": "alice"} for i in range(1, n + 1)]
    extend(0, GENESIS, docs)
    return docs


def test_a_consistently_rechained_repository_passes_the_chain_but_not_the_checkpoint(key_file):
    docs = _chain(20)
    signer = CheckpointSigner.from_file(key_file)
    cp = signer.sign(1, 20, [bytes.fromhex(d[HASH]) for d in docs], created_at=datetime.now(UTC))
    # an attacker with write access to the repository edits event 7 and recomputes every later link
    forged = [dict(d) for d in docs]
    forged[6]["user.name"] = "mallory"
    prev = forged[5][HASH]
    for d in forged[6:]:
        d[PREV] = prev
        d[HASH] = prev = link_hash(prev, d)
    assert verify_chain(forged, start_prev=GENESIS, expected_first_seq=1).intact
    tap = CheckpointTap([cp], load_public_key(key_file))
    verify_chain(tap.wrap(iter(forged)), start_prev=GENESIS, expected_first_seq=1)
    assert [(f.kind, f.seq) for f in tap.findings] == [("checkpoint", 1)]
    assert "Merkle root" in tap.findings[0].detail
    clean = CheckpointTap([cp], load_public_key(key_file))
    verify_chain(clean.wrap(iter(docs)), start_prev=GENESIS, expected_first_seq=1)
    assert clean.findings == [] and clean.verified == 1


def test_a_checkpoint_signed_by_another_key_is_named(tmp_path, key_file):
    other = tmp_path / "other.pem"
    generate_key_file(other)
    docs = _chain(5)
    cp = CheckpointSigner.from_file(other).sign(1, 5, [bytes.fromhex(d[HASH]) for d in docs],
                                                created_at=datetime.now(UTC))
    tap = CheckpointTap([cp], load_public_key(key_file))
    list(tap.wrap(iter(docs)))
    assert [f.kind for f in tap.findings] == ["checkpoint"]
    assert "signature" in tap.findings[0].detail


def test_checkpoint_document_round_trips(key_file):
    from compliance.audit.checkpoints import Checkpoint

    cp = CheckpointSigner.from_file(key_file).sign(3, 4, [b"x" * 32, b"y" * 32], created_at=datetime.now(UTC))
    again = Checkpoint.from_document(json.loads(json.dumps(cp.to_document())))
    assert again == cp and again.verify_signature(load_public_key(key_file))
    assert SEQ  # the chain fields module is shared
