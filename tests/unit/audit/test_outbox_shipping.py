"""The outbox and shipper on a real SQLite file, with an in-memory sink (pure logic, no network)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from compliance.audit.interfaces import AuditSinkUnavailable, ShipResult
from compliance.audit.outbox import OutboxEntry, SqlAuditOutbox
from compliance.audit.shipper import AuditShipper
from compliance.db.migrate import upgrade
from compliance.db.session import make_engine
from compliance.errors import AuditFailure


class MemorySink:
    def __init__(self) -> None:
        self.docs: dict[str, dict] = {}
        self.deliveries = 0
        self.down = False
        self.ready_calls = 0

    def ensure_ready(self) -> None:
        if self.down:
            raise AuditSinkUnavailable("down")
        self.ready_calls += 1

    def ship(self, batch: Sequence[tuple[str, dict]]) -> ShipResult:
        if self.down:
            raise AuditSinkUnavailable("down")
        for uuid, doc in batch:
            self.deliveries += 1
            self.docs.setdefault(uuid, doc)
        return ShipResult(shipped=tuple(u for u, _ in batch))


def entry(i: int) -> OutboxEntry:
    return OutboxEntry(uuid=f"00000000-0000-0000-0000-{i:012d}", event_code="110112",
                       occurred_at=datetime(2026, 11, 28, tzinfo=UTC), document={"n": i})



def rows(tmp_path) -> list[tuple]:
    con = sqlite3.connect(tmp_path / "outbox.db")
    try:
        return con.execute("select seq, uuid, document, shipped_at from audit_outbox order by seq").fetchall()
    finally:
        con.close()


def test_submitted_entries_are_on_disk_when_the_future_resolves(outbox, tmp_path):
    futures = [outbox.submit(entry(i)) for i in range(50)]
    for f in futures:
        f.result(timeout=10)
    on_disk = rows(tmp_path)
    assert len(on_disk) == 50
    assert [json.loads(r[2])["n"] for r in on_disk] == list(range(50))


def test_concurrent_async_recording_commits_every_event(outbox, tmp_path):
    async def main():
        await asyncio.gather(*(asyncio.wrap_future(outbox.submit(entry(i))) for i in range(200)))

    asyncio.run(main())
    assert len(rows(tmp_path)) == 200


def test_a_database_failure_fails_the_waiting_requests(tmp_path):
    url = f"sqlite:///{tmp_path / 'missing.db'}"  # no migration: the table does not exist
    ob = SqlAuditOutbox(make_engine(url))
    with pytest.raises(AuditFailure):
        ob.submit(entry(1)).result(timeout=10)
    ob.close()


def test_duplicate_uuid_is_refused_not_silently_dropped(outbox):
    outbox.append_now([entry(1)])
    with pytest.raises(AuditFailure):
        outbox.append_now([entry(1)])


def test_shipper_delivers_in_order_and_marks_shipped(outbox, tmp_path):
    outbox.append_now([entry(i) for i in range(25)])
    sink = MemorySink()
    shipper = AuditShipper(outbox, sink, batch_size=10)
    assert shipper.ship_once() == 10
    assert shipper.ship_once() == 10
    assert shipper.ship_once() == 5
    assert shipper.ship_once() == 0
    assert outbox.backlog() == 0
    assert len(sink.docs) == 25
    assert all(r[3] is not None for r in rows(tmp_path))


def test_nothing_is_lost_while_the_sink_is_down(outbox):
    sink = MemorySink()
    sink.down = True
    shipper = AuditShipper(outbox, sink, batch_size=100)
    outbox.append_now([entry(i) for i in range(30)])
    with pytest.raises(AuditSinkUnavailable):
        shipper.ship_once()
    assert outbox.backlog() == 30
    sink.down = False
    shipper._sink_ready = False
    assert shipper.ship_once() == 30
    assert outbox.backlog() == 0
    assert len(sink.docs) == 30


def test_redelivery_after_a_crash_is_idempotent(outbox):
    """A crash between shipping and marking shipped re-sends the batch; the sink keeps one copy."""
    outbox.append_now([entry(i) for i in range(5)])
    sink = MemorySink()
    batch = outbox.pending(100)
    sink.ship([(u, d) for _, u, d in batch])  # shipped, then "crash" before mark_shipped
    shipper = AuditShipper(outbox, sink)
    assert shipper.ship_once() == 5
    assert sink.deliveries == 10
    assert len(sink.docs) == 5


def test_background_thread_drains_and_stops(outbox):
    sink = MemorySink()
    shipper = AuditShipper(outbox, sink, interval_seconds=0.05)
    shipper.start()
    outbox.append_now([entry(i) for i in range(7)])
    shipper.wake()
    shipper.stop(drain_seconds=5)
    assert outbox.backlog() == 0
    assert not any(t.name == "audit-shipper" and t.is_alive() for t in threading.enumerate())


def test_concurrent_writers_on_separate_connections_never_fork_the_chain(tmp_path):
    """Four writers with their own engines (as four gateway processes would be) on one SQLite file."""
    from compliance.audit.chain import GENESIS, verify_chain

    url = f"sqlite:///{tmp_path / 'c.db'}"
    upgrade(url)
    writers = [SqlAuditOutbox(make_engine(url)) for _ in range(4)]
    errors: list[BaseException] = []

    def write(w: SqlAuditOutbox, base: int) -> None:
        try:
            for i in range(40):
                w.append_now([entry(base + i)])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w, k * 1000)) for k, w in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    docs = [d for _, _, d in writers[0].pending(1000)]
    assert len(docs) == 160
    v = verify_chain(docs, start_prev=GENESIS, expected_first_seq=1, expected_last_seq=160)
    assert v.intact, v.findings[:3]
    assert writers[0].chain_head()[0] == 160
    for w in writers:
        w.close()


def test_rows_carry_the_chain_in_columns_and_document(outbox, tmp_path):
    outbox.append_now([entry(1), entry(2)])
    con = sqlite3.connect(tmp_path / "outbox.db")
    rows = con.execute("select seq, prev_hash, hash, document from audit_outbox order by seq").fetchall()
    con.close()
    assert rows[0][1] == "0" * 64
    assert rows[1][1] == rows[0][2]
    doc = json.loads(rows[1][3])
    assert doc["chain.seq"] == 2 and doc["chain.hash"] == rows[1][2]
