"""`compliance audit verify` compares the repository with the outbox at every position both hold (issue 12
item 4): a tail rewritten and re-chained in Elasticsearch is named event by event, in batches, on a real
SQLite outbox and an in-memory stand-in for Elasticsearch's search API."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from compliance.audit.chain import GENESIS, HASH, PREV, SEQ, link_hash, verify_chain
from compliance.audit.outbox import OutboxEntry, SqlAuditOutbox
from compliance.audit.verify import OutboxComparison, verify_repository


class FakeEs:
    """The two searches iter_repository makes: documents without chain fields, then a seq range sorted
    by (chain.seq, event.uuid) with search_after."""

    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self.docs = docs
        self.searches = 0

    def search(self, *, query: dict, size: int, search_after: list | None = None, **_: Any) -> dict:
        self.searches += 1
        if "bool" in query:
            found = [d for d in self.docs if SEQ not in d]
        else:
            rng = query["range"][SEQ]
            found = sorted((d for d in self.docs if SEQ in d and rng["gte"] <= d[SEQ] <= rng.get("lte", 1 << 62)),
                           key=lambda d: (d[SEQ], d["event.uuid"]))
            if search_after is not None:
                found = [d for d in found if [d[SEQ], d["event.uuid"]] > search_after]
        return {"hits": {"hits": [{"_id": d["event.uuid"], "_source": copy.deepcopy(d),
                                   "sort": [d.get(SEQ), d["event.uuid"]]} for d in found[:size]]}}


def entry(i: int) -> OutboxEntry:
    return OutboxEntry(uuid=f"00000000-0000-0000-0000-{i:012d}", event_code="110112",
                       occurred_at=datetime(2026, 11, 28, 10, 0, i % 60, tzinfo=UTC),
                       document={"@timestamp": "2026-11-28T10:00:00.000Z", "event.uuid": f"00000000-0000-0000-0000-"
                                 f"{i:012d}", "event.id": "110112", "user.name": "alice", "patient.ids": [f"P{i}"]})


def recorded(outbox: SqlAuditOutbox, n: int) -> list[dict[str, Any]]:
    """``n`` events recorded in the outbox and shipped: the repository's copies of them."""
    outbox.append_now([entry(i) for i in range(1, n + 1)])
    docs = [doc for _, _, doc in outbox.pending(n)]
    outbox.mark_shipped_seqs(range(1, n + 1))
    return docs


def rechain(docs: list[dict[str, Any]], start: int) -> None:
    """What someone with write access to Elasticsearch does after editing: recompute every later link."""
    prev = docs[start - 1][HASH] if start else GENESIS
    for doc in docs[start:]:
        doc[PREV] = prev
        doc[HASH] = prev = link_hash(prev, doc)


def verify(outbox: SqlAuditOutbox, docs: list[dict[str, Any]], **kw: Any):
    return verify_repository(FakeEs(docs), "p", outbox, engine=outbox._engine, **kw)  # noqa: SLF001


def pages(docs: list[dict[str, Any]], size: int = 2000) -> list[list[dict[str, Any]]]:
    """The documents as pages of search hits (what repository_pages yields)."""
    return [[{"_id": d["event.uuid"], "_source": d} for d in docs[i:i + size]] for i in range(0, len(docs), size)]


def strip_ids(docs) -> list[dict[str, Any]]:
    return [{k: v for k, v in d.items() if k != "_id"} for d in docs]


def kinds(result) -> list[tuple[str, int | None, str | None]]:
    return [(f.kind, f.seq, f.uuid) for f in result.findings]


def test_an_untouched_trail_is_intact_and_compared_everywhere(outbox):
    docs = recorded(outbox, 12)
    result = verify(outbox, docs)
    assert result.intact, result.findings
    assert result.outbox_compared == 12
    assert "the outbox's record matched at 12 position(s)" in result.summary()


def test_a_rewritten_and_rechained_tail_is_named_event_by_event(outbox):
    """The attack of item 4: the newest events edited and re-chained, so the chain alone is consistent."""
    docs = recorded(outbox, 12)
    for doc in (docs[9], docs[11]):
        doc["user.name"] = "mallory"
        doc["patient.ids"] = ["SOMEONE-ELSE"]
    rechain(docs, 9)
    assert verify_chain(docs, start_prev=GENESIS, expected_first_seq=1, expected_last_seq=12).intact  # the premise
    result = verify(outbox, docs)
    assert not result.intact
    assert kinds(result) == [("rewritten", 10, docs[9]["event.uuid"]), ("relinked", 11, docs[10]["event.uuid"]),
                             ("rewritten", 12, docs[11]["event.uuid"])]
    assert result.summary().startswith("BROKEN at seq 10 (rewritten, event 00000000-0000-0000-0000-000000000010)")


def test_an_event_substituted_at_a_position_names_the_recorded_one(outbox):
    docs = recorded(outbox, 6)
    docs[5] = {**docs[5], "event.uuid": "forged-uuid", "user.name": "mallory"}
    rechain(docs, 5)
    result = verify(outbox, docs)
    assert [(f.kind, f.seq, f.uuid) for f in result.findings] == [("rewritten", 6, "forged-uuid")]
    assert "00000000-0000-0000-0000-000000000006" in result.findings[0].detail


def test_an_event_appended_past_the_outbox_is_inserted(outbox):
    docs = recorded(outbox, 5)
    forged = {**docs[4], "event.uuid": "forged-tail", SEQ: 6}
    docs.append(forged)
    rechain(docs, 5)
    assert verify_chain(docs, start_prev=GENESIS, expected_first_seq=1, expected_last_seq=5).intact  # the premise
    assert kinds(verify(outbox, docs)) == [("inserted", 6, "forged-tail")]


def test_a_plain_modification_is_named_once(outbox):
    docs = recorded(outbox, 5)
    docs[2]["user.name"] = "mallory"  # not re-chained: the chain names it, the outbox agrees on the hash
    assert kinds(verify(outbox, docs)) == [("modified", 3, docs[2]["event.uuid"])]


def test_a_duplicate_is_named_once(outbox):
    docs = recorded(outbox, 5)
    docs.insert(3, {**docs[2], "event.uuid": "00000000-forged"})
    assert kinds(verify(outbox, docs)) == [("duplicated", 3, "00000000-forged")]


def test_compared_a_page_at_a_time_one_outbox_query_each(outbox):
    docs = recorded(outbox, 25)
    comparison = OutboxComparison(outbox._engine)  # noqa: SLF001
    reads: list[list[int]] = []
    rows = comparison._rows  # noqa: SLF001
    comparison._rows = lambda seqs: reads.append(list(seqs)) or rows(seqs)  # type: ignore[method-assign]
    seen = list(comparison.documents(iter(pages(docs, 10))))
    assert strip_ids(seen) == docs and comparison.compared == 25 and not comparison.findings
    assert [(r[0], r[-1], len(r)) for r in reads] == [(1, 10, 10), (11, 20, 10), (21, 25, 5)]


def test_sparse_positions_are_read_by_list_not_range(outbox):
    docs = recorded(outbox, 200)
    kept = [docs[0], docs[1], docs[198], docs[199]]
    kept[3] = {**kept[3], "user.name": "mallory"}
    rechain(kept, 3)
    comparison = OutboxComparison(outbox._engine)  # noqa: SLF001
    list(comparison.documents(pages(kept)))
    assert comparison.compared == 4
    assert [(f.kind, f.seq) for f in comparison.findings] == [("rewritten", 200)]


def test_a_long_rewrite_is_listed_up_to_a_bound_then_summed_up(outbox):
    docs = recorded(outbox, 30)
    docs[4]["user.name"] = "mallory"
    rechain(docs, 4)
    comparison = OutboxComparison(outbox._engine, max_listed=5)  # noqa: SLF001
    list(comparison.documents(pages(docs, 7)))
    assert [(f.kind, f.seq) for f in comparison.findings] == [
        ("rewritten", 5), ("relinked", 6), ("relinked", 7), ("relinked", 8), ("relinked", 9), ("rewritten", 10)]
    assert "21 more events at positions 10..30" in comparison.findings[-1].detail


def test_the_range_checked_is_the_one_asked_for(outbox):
    docs = recorded(outbox, 10)
    docs[8]["user.name"] = "mallory"
    rechain(docs, 8)
    assert verify(outbox, docs, from_seq=3, to_seq=8).intact
    assert kinds(verify(outbox, docs, from_seq=3)) == [("rewritten", 9, docs[8]["event.uuid"]),
                                                       ("relinked", 10, docs[9]["event.uuid"])]


def test_the_outbox_needs_its_engine(outbox):
    with pytest.raises(ValueError, match="engine"):
        verify_repository(FakeEs([]), "p", outbox)
