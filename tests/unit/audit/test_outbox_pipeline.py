"""The outbox's fast paths (stored text shipped as is, range reads and marks, the pipelined shipper,
the async group-commit waiters) on a real SQLite file, with in-memory sinks (no network)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from compliance.audit.chain import GENESIS, verify_chain
from compliance.audit.interfaces import AuditSinkUnavailable, ShipResult
from compliance.audit.models import AuditOutboxRow
from compliance.audit.outbox import OutboxEntry, SqlAuditOutbox, seq_ranges
from compliance.audit.shipper import AuditShipper
from compliance.db.migrate import upgrade
from compliance.db.session import make_engine
from compliance.errors import AuditFailure


def entry(i: int, **extra) -> OutboxEntry:
    return OutboxEntry(uuid=f"00000000-0000-0000-0000-{i:012d}", event_code="110112",
                       occurred_at=datetime(2026, 11, 28, 10, 0, i % 60, 123456, tzinfo=UTC),
                       document={"@timestamp": "2026-11-28T10:00:00.000Z", "n": i, "name": "山田^太郎", **extra})


@pytest.fixture
def url(tmp_path):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    upgrade(url)
    return url


@pytest.fixture
def outbox(url):
    ob = SqlAuditOutbox(make_engine(url))
    yield ob
    ob.close()


def stored(tmp_path) -> list[tuple]:
    con = sqlite3.connect(tmp_path / "o.db")
    try:
        return con.execute("select seq, uuid, document, shipped_at, attempts, last_error "
                           "from audit_outbox order by seq").fetchall()
    finally:
        con.close()


class TextSink:
    """Takes the stored text (like ElasticsearchAuditSink.ship_serialized); can be slowed or failed."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}
        self.batches: list[list[str]] = []
        self.attempts: list[str] = []  # the first uuid of every batch offered, delivered or not
        self.calls = 0
        self.fail_calls: set[int] = set()
        self.refuse: set[str] = set()
        self.delay = 0.0
        self.in_flight = threading.Event()

    def ensure_ready(self) -> None:
        pass

    def ship(self, batch: Sequence[tuple[str, dict]]) -> ShipResult:  # pragma: no cover - not used
        raise AssertionError("the stored text must be shipped, not a re-parsed document")

    def ship_serialized(self, batch: Sequence[tuple[str, str]]) -> ShipResult:
        self.calls += 1
        self.attempts.append(batch[0][0])
        self.in_flight.set()
        try:
            if self.delay:
                time.sleep(self.delay)
            if self.calls in self.fail_calls:
                raise AuditSinkUnavailable("down")
            self.batches.append([u for u, _ in batch])
            ok = []
            for u, text in batch:
                if u in self.refuse:
                    continue
                self.texts.setdefault(u, text)
                ok.append(u)
            return ShipResult(shipped=tuple(ok), failed={u: "400 mapper_parsing_exception: no" for u, _ in batch
                                                         if u in self.refuse})
        finally:
            self.in_flight.clear()


# ------------------------------------------------------------------ pure helpers

def test_seq_ranges_collapses_runs_of_consecutive_positions():
    assert seq_ranges([]) == []
    assert seq_ranges([5]) == [(5, 5)]
    assert seq_ranges([3, 1, 2, 7, 8, 10]) == [(1, 3), (7, 8), (10, 10)]
    assert seq_ranges([4, 4, 5]) == [(4, 5)]


# ------------------------------------------------------------------ reading and marking by position

def test_pending_rows_after_a_position_skip_shipped_rows_and_keep_order(outbox):
    outbox.append_now([entry(i) for i in range(10)])
    outbox.mark_shipped_seqs([3, 4])
    assert [r.seq for r in outbox.pending_rows(100)] == [1, 2, 5, 6, 7, 8, 9, 10]
    assert [r.seq for r in outbox.pending_rows(3, after_seq=4)] == [5, 6, 7]
    assert outbox.pending_rows(10, after_seq=10) == []


def test_mark_shipped_seqs_marks_exactly_those_rows_and_keeps_an_earlier_mark(outbox, tmp_path):
    outbox.append_now([entry(i) for i in range(10)])
    outbox.mark_shipped_seqs([2])
    first_mark = stored(tmp_path)[1][3]
    time.sleep(0.01)
    outbox.mark_shipped_seqs([1, 2, 3, 7, 9])
    rows = stored(tmp_path)
    assert [r[0] for r in rows if r[3] is not None] == [1, 2, 3, 7, 9]
    assert rows[1][3] == first_mark  # already shipped: not re-marked
    assert outbox.backlog() == 5


def test_failed_rows_count_attempts_with_their_own_reason(outbox, tmp_path):
    outbox.append_now([entry(i) for i in range(3)])
    outbox.mark_failed_each({entry(0).uuid: "400 a", entry(2).uuid: "429 b"})
    outbox.mark_failed_each({entry(2).uuid: "429 c"})
    rows = stored(tmp_path)
    assert [(r[4], r[5]) for r in rows] == [(1, "400 a"), (0, None), (2, "429 c")]


# ------------------------------------------------------------------ the write path

def test_rows_store_the_same_values_as_the_orm_would(outbox, url):
    """The INSERT goes to the driver directly: values must still go through the column types."""
    e = entry(1)
    before = datetime.now(UTC)
    outbox.append_now([e])
    after = datetime.now(UTC)
    engine = make_engine(url)
    with engine.connect() as conn:
        row = conn.execute(select(AuditOutboxRow.__table__)).one()
    assert row.uuid == e.uuid and row.event_code == "110112" and row.attempts == 0
    assert row.occurred_at.replace(tzinfo=UTC) == e.occurred_at  # SQLite keeps naive UTC, as before
    assert before <= row.recorded_at.replace(tzinfo=UTC) <= after and row.shipped_at is None
    con = sqlite3.connect(url.removeprefix("sqlite:///"))
    raw = con.execute("select occurred_at, typeof(seq) from audit_outbox").fetchone()
    con.close()
    assert raw == ("2026-11-28 10:00:01.123456", "integer")
    engine.dispose()


def test_a_writer_whose_head_moved_links_to_the_locked_head(url):
    """Rows are linked before the transaction against this process's last head; when another
    writer moved the head meanwhile, they are linked again to the locked head."""
    a, b = SqlAuditOutbox(make_engine(url)), SqlAuditOutbox(make_engine(url))
    a.append_now([entry(1), entry(2)])
    b.append_now([entry(3)])  # a's remembered head is now stale
    a.append_now([entry(4), entry(5)])
    b.append_now([entry(6)])
    docs = [d for _, _, d in a.pending(100)]
    assert [d["n"] for d in docs] == [1, 2, 3, 4, 5, 6]
    v = verify_chain(docs, start_prev=GENESIS, expected_first_seq=1, expected_last_seq=6)
    assert v.intact, v.findings
    assert a.chain_head() == (6, docs[-1]["chain.hash"])


def test_writers_taking_turns_stop_linking_ahead_twice(url, monkeypatch):
    """Two processes appending in turn: the remembered head is always stale, so linking ahead of
    the lock would be done twice per append; after a few misses the writer links under the lock."""
    a, b = SqlAuditOutbox(make_engine(url)), SqlAuditOutbox(make_engine(url))
    calls = []
    original = a._prepare
    monkeypatch.setattr(a, "_prepare", lambda *args: calls.append(1) or original(*args))
    for i in range(40):
        a.append_now([entry(2 * i)])
        b.append_now([entry(2 * i + 1)])
    assert 40 <= len(calls) <= 50
    docs = [d for _, _, d in a.pending(100)]
    assert verify_chain(docs, start_prev=GENESIS, expected_first_seq=1, expected_last_seq=80).intact


def test_a_failed_transaction_does_not_leave_a_wrong_head_behind(outbox):
    outbox.append_now([entry(1)])
    with pytest.raises(AuditFailure):
        outbox.append_now([entry(1)])  # duplicate uuid: rolled back
    outbox.append_now([entry(2)])
    docs = [d for _, _, d in outbox.pending(10)]
    assert [d["chain.seq"] for d in docs] == [1, 2]
    assert verify_chain(docs, start_prev=GENESIS, expected_first_seq=1).intact


def test_record_waits_for_the_commit_and_wakes_each_loop_once_per_group(outbox, tmp_path, monkeypatch):
    wakeups = []

    async def main():
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe

        def counting(callback, *args, **kwargs):
            wakeups.append(len(args[0]) if args and isinstance(args[0], list) else 0)
            return original(callback, *args, **kwargs)

        monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
        await asyncio.gather(*(outbox.record(entry(i)) for i in range(300)))
        return len(stored(tmp_path))

    assert asyncio.run(main()) == 300  # every event on disk when its wait returned
    assert sum(wakeups) == 300 and len(wakeups) < 300  # whole groups released per wakeup


def test_record_raises_when_the_event_cannot_be_recorded(tmp_path):
    ob = SqlAuditOutbox(make_engine(f"sqlite:///{tmp_path / 'missing.db'}"))  # no table

    async def main():
        await ob.record(entry(1))

    with pytest.raises(AuditFailure):
        asyncio.run(main())
    ob.close()


def test_a_cancelled_waiter_does_not_stop_the_writer(outbox, tmp_path):
    cancelled = outbox.submit(entry(1))
    cancelled.cancel()  # may or may not win against the writer; either way nothing may hang
    futures = [outbox.submit(entry(i)) for i in range(2, 50)]
    for f in futures:
        f.result(timeout=10)

    async def main():
        task = asyncio.ensure_future(outbox.record(entry(100)))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(*(outbox.record(entry(i)) for i in range(101, 120)))

    asyncio.run(main())
    assert {r[1] for r in stored(tmp_path)} >= {entry(i).uuid for i in [*range(2, 50), *range(101, 120)]}


# ------------------------------------------------------------------ shipping the stored text

def test_the_stored_text_is_shipped_unchanged(outbox, tmp_path):
    outbox.append_now([entry(i) for i in range(5)])
    sink = TextSink()
    assert AuditShipper(outbox, sink).ship_once() == 5
    for seq, uuid, text, *_ in stored(tmp_path):
        assert sink.texts[uuid] == text  # byte for byte what the outbox committed
        assert json.loads(text)["chain.seq"] == seq


def test_sinks_without_a_text_path_get_parsed_documents(outbox):
    outbox.append_now([entry(i) for i in range(3)])
    got: list[dict] = []

    class DictSink:
        def ensure_ready(self):
            pass

        def ship(self, batch):
            got.extend(d for _, d in batch)
            return ShipResult(shipped=tuple(u for u, _ in batch))

    assert AuditShipper(outbox, DictSink()).ship_once() == 3
    assert [d["n"] for d in got] == [0, 1, 2] and all("chain.hash" in d for d in got)


def test_refused_rows_stay_pending_and_are_sent_again_once_caught_up(outbox):
    outbox.append_now([entry(i) for i in range(30)])
    sink = TextSink()
    refused = entry(3).uuid
    sink.refuse = {refused}
    shipper = AuditShipper(outbox, sink, batch_size=10, interval_seconds=0.02)
    shipper.start()
    try:
        deadline = time.monotonic() + 10
        # caught up with everything else, the loop keeps offering the refused row again
        while sum(refused in b for b in sink.batches) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert outbox.backlog() == 1
        sink.refuse = set()  # e.g. the mapping was fixed
        while outbox.backlog() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert outbox.backlog() == 0  # by the running loop, not by the drain at stop
    finally:
        shipper.stop(drain_seconds=2)
    assert len(sink.texts) == 30


def test_the_next_batch_is_read_while_one_is_in_flight_and_marks_stay_in_order(outbox, monkeypatch):
    outbox.append_now([entry(i) for i in range(40)])
    sink = TextSink()
    sink.delay = 0.15
    reads_during_flight = []
    marked: list[list[int]] = []
    original_read, original_mark = outbox.pending_rows, outbox.mark_shipped_seqs

    def read(limit, *, after_seq=None):
        reads_during_flight.append(sink.in_flight.is_set())
        return original_read(limit, after_seq=after_seq)

    def mark(seqs):
        seqs = list(seqs)
        marked.append(seqs)
        original_mark(seqs)

    monkeypatch.setattr(outbox, "pending_rows", read)
    monkeypatch.setattr(outbox, "mark_shipped_seqs", mark)
    shipper = AuditShipper(outbox, sink, batch_size=10, interval_seconds=0.05)
    shipper.start()
    deadline = time.monotonic() + 10
    while outbox.backlog() and time.monotonic() < deadline:
        time.sleep(0.02)
    shipper.stop(drain_seconds=2)
    assert outbox.backlog() == 0
    assert any(reads_during_flight), "the shipper never read ahead while a batch was in flight"
    flat = [s for batch in marked for s in batch]
    assert flat == list(range(1, 41))  # each batch marked once, in chain order


def test_a_batch_lost_in_flight_is_sent_again_and_nothing_is_lost(outbox):
    """The sink fails while a batch is in flight and the next one was already read ahead."""
    outbox.append_now([entry(i) for i in range(50)])
    sink = TextSink()
    sink.delay = 0.02
    sink.fail_calls = {2, 3}
    shipper = AuditShipper(outbox, sink, batch_size=10, interval_seconds=0.02, max_backoff_seconds=0.05)
    shipper.start()
    deadline = time.monotonic() + 15
    while outbox.backlog() and time.monotonic() < deadline:
        shipper.wake()
        time.sleep(0.02)
    shipper.stop(drain_seconds=2)
    assert outbox.backlog() == 0
    assert sorted(sink.texts) == sorted(entry(i).uuid for i in range(50))
    delivered = [u for b in sink.batches for u in b]
    assert set(delivered) == set(sink.texts)  # only re-deliveries (idempotent), no gaps
    assert sink.attempts == sorted(sink.attempts)  # after a failure it goes back to the lost batch first


def test_stop_records_the_batch_in_flight(outbox):
    outbox.append_now([entry(i) for i in range(10)])
    sink = TextSink()
    sink.delay = 0.3
    shipper = AuditShipper(outbox, sink, batch_size=100, interval_seconds=0.01)
    shipper.start()
    assert sink.in_flight.wait(5)
    shipper.stop(drain_seconds=0)
    assert outbox.backlog() == 0 and sink.calls == 1


# ------------------------------------------------------------------ marks riding on the writer's commits (SQLite)

def test_marks_handed_to_the_writer_are_committed_when_their_future_resolves(outbox):
    outbox.append_now([entry(i) for i in range(10)])
    done = outbox.mark_shipped_soon([1, 2, 3, 5])
    done.result(timeout=10)
    assert [r.seq for r in outbox.pending_rows(100)] == [4, 6, 7, 8, 9, 10]


def hold_writer(outbox, monkeypatch):
    """Make the writer's first group wait until released, so what is queued meanwhile forms one group."""
    calls: list[tuple[int, tuple[int, ...]]] = []
    inside, release = threading.Event(), threading.Event()
    original = outbox.append_now

    def spy(entries, *, shipped_seqs=()):
        calls.append((len(entries), tuple(shipped_seqs)))
        if not inside.is_set():
            inside.set()
            release.wait(10)
        return original(entries, shipped_seqs=shipped_seqs)

    monkeypatch.setattr(outbox, "append_now", spy)
    first = outbox.submit(entry(1000))
    assert inside.wait(10)
    return calls, release, first


def test_marks_and_new_events_share_one_commit(outbox, monkeypatch):
    outbox.append_now([entry(i) for i in range(5)])
    calls, release, first = hold_writer(outbox, monkeypatch)
    marks = outbox.mark_shipped_soon([1, 2, 3])
    futures = [outbox.submit(entry(i)) for i in range(101, 104)]
    release.set()
    for f in [first, *futures]:
        f.result(timeout=10)
    marks.result(timeout=10)
    assert calls[1] == (3, (1, 2, 3))  # the three new events and the marks: one transaction
    assert outbox.backlog() == 2 + 4


def test_a_failing_mark_never_fails_the_requests_in_its_group(outbox, monkeypatch):
    from compliance.audit import outbox as outbox_module

    outbox.append_now([entry(i) for i in range(3)])
    calls, release, first = hold_writer(outbox, monkeypatch)
    broken = outbox_module.update(outbox_module._TABLE).values(no_such_column=1)
    monkeypatch.setattr(outbox_module, "_MARK_SHIPPED", broken)
    # the writer runs the statement compiled at start-up: break that one too
    monkeypatch.setattr(outbox._head_sql, "mark", ("UPDATE audit_outbox SET no_such_column = 1", None))
    marks = outbox.mark_shipped_soon([1, 2])
    recorded = outbox.submit(entry(10))
    release.set()
    first.result(timeout=10)
    recorded.result(timeout=10)  # recorded despite the bookkeeping failure
    marks.result(timeout=10)
    assert calls[1:] == [(1, (1, 2)), (1, ())]  # tried with the marks, then without them
    assert outbox.backlog() == 5  # the marks were not applied: those rows are simply shipped again
    docs = [d for _, _, d in outbox.pending(10)]
    assert verify_chain(docs, start_prev=GENESIS, expected_first_seq=1, expected_last_seq=5).intact
