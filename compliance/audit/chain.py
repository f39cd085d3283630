"""The audit hash chain: tamper evidence over the events in outbox order.

Each event document carries three fields added by the outbox writer when it is recorded:

    chain.seq   its position, 1, 2, 3, ... with no gaps
    chain.prev  the chain.hash of the event before it ("0" * 64 before the first)
    chain.hash  SHA-256( chain.prev || 0x0A || canonical(document without chain.hash) ), hex

``canonical`` is the document as JSON with sorted keys, no insignificant whitespace, UTF-8. Because
``chain.seq`` and ``chain.prev`` are inside what is hashed, changing any field of an event, removing
an event, inserting one or swapping two breaks the chain at a place :func:`verify_chain` names.

The head (last seq and hash) lives in the one-row table ``audit_chain_head``. The writer locks that row
first in every append transaction (an UPDATE), so concurrent writers in several gateway processes,
on SQLite or PostgreSQL, extend the chain one after the other and it can never fork.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

GENESIS = "0" * 64
SEQ, PREV, HASH = "chain.seq", "chain.prev", "chain.hash"


def _canonical_json(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def canonical(document: Mapping[str, Any]) -> bytes:
    """Sorted keys, no whitespace, UTF-8 (orjson's output equals ``json.dumps``'s for the types an
    audit document holds: str, int, bool, None, lists and dicts; tested). Anything orjson refuses
    (a lone surrogate, an integer beyond 64 bits) takes the standard library's path."""
    try:
        return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONEncodeError, TypeError):
        return _canonical_json(document)


def link_hash(prev: str, document: Mapping[str, Any]) -> str:
    """The chain hash of ``document`` (its own chain.hash and a search hit's ``_id`` are ignored)."""
    body = dict(document)  # a copy without the two fields (ten times faster than filtering each key)
    body.pop(HASH, None)
    body.pop("_id", None)
    return hashlib.sha256(prev.encode("ascii") + b"\n" + canonical(body)).hexdigest()


def extend_serialized(head_seq: int, head_hash: str,
                      documents: Iterable[dict[str, Any]]) -> tuple[int, str, list[str]]:
    """:func:`extend`, also returning each linked document as JSON text (for storage).

    The canonical serialization made for the hash is reused: the stored text is it with
    ``chain.hash`` appended (valid JSON, the same document), so each event is serialized once.
    """
    seq, prev = head_seq, head_hash
    texts: list[str] = []
    for doc in documents:
        seq += 1
        doc[SEQ] = seq
        doc[PREV] = prev
        body = doc if HASH not in doc and "_id" not in doc else {k: v for k, v in doc.items()
                                                                  if k not in (HASH, "_id")}
        raw = canonical(body)
        doc[HASH] = prev = hashlib.sha256(prev.encode("ascii") + b"\n" + raw).hexdigest()
        texts.append(f'{raw[:-1].decode("utf-8")},"{HASH}":"{prev}"}}')
    return seq, prev, texts


def extend(head_seq: int, head_hash: str, documents: Iterable[dict[str, Any]]) -> tuple[int, str]:
    """Add chain fields to each document in order (in place); return the new head."""
    seq, prev = head_seq, head_hash
    for doc in documents:
        seq += 1
        doc[SEQ] = seq
        doc[PREV] = prev
        doc[HASH] = prev = link_hash(prev, doc)
    return seq, prev


@dataclass(frozen=True)
class Finding:
    kind: str  # modified | deleted | inserted | reordered | duplicated | rewritten | relinked | checkpoint
    seq: int | None
    uuid: str | None
    detail: str


@dataclass
class Verification:
    checked: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    head_hash: str | None = None
    findings: list[Finding] = field(default_factory=list)
    #: Signed checkpoints whose signature and Merkle root matched the repository's events.
    checkpoints: int = 0
    #: Positions at which the repository's event was compared with the outbox's record (None: not compared).
    outbox_compared: int | None = None

    @property
    def intact(self) -> bool:
        return not self.findings

    def summary(self) -> str:
        if self.intact:
            compared = ("" if self.outbox_compared is None
                        else f"the outbox's record matched at {self.outbox_compared} position(s), ")
            return (f"intact: {self.checked} events, seq {self.first_seq}..{self.last_seq}, "
                    f"head {self.head_hash}, {compared}{self.checkpoints} signed checkpoint(s) verified")
        first = self.findings[0]
        return (f"BROKEN at seq {first.seq} ({first.kind}, event {first.uuid}): {first.detail}; "
                f"{len(self.findings)} finding(s) in {self.checked} events")


def _original_position(doc: Mapping[str, Any], *, window: int) -> int | None:
    """When only chain.seq was changed (the event moved), the position its hash was made at."""
    seq = int(doc[SEQ])
    body = {k: v for k, v in doc.items() if k not in ("_id",)}
    for candidate in range(max(1, seq - window), seq + window + 1):
        if candidate != seq and link_hash(str(doc.get(PREV)), {**body, SEQ: candidate}) == doc[HASH]:
            return candidate
    return None


def verify_chain(documents: Iterable[Mapping[str, Any]], *, start_prev: str | None = None,
                 expected_first_seq: int | None = None, expected_last_seq: int | None = None,
                 reorder_window: int = 256) -> Verification:
    """Check documents sorted by chain.seq (as stored in the repository), in one pass and constant memory
    (two documents claiming one position are next to each other in that order).

    ``start_prev``: the hash the first document must link to (the genesis, or the hash of the event
    before a verified range). ``expected_last_seq``: the local head, so trailing deletions show too.
    Reports every finding, first broken place first.
    """
    result = Verification()
    prev_hash = start_prev
    prev_seq: int | None = None
    for doc in documents:
        result.checked += 1
        uuid = doc.get("event.uuid")
        seq = doc.get(SEQ)
        if not isinstance(seq, int) or not isinstance(doc.get(HASH), str):
            result.findings.append(Finding("inserted", None, uuid, "event carries no chain fields"))
            continue
        if result.first_seq is None:
            result.first_seq = seq
            expected = expected_first_seq if expected_first_seq is not None else seq
            if seq > expected:
                result.findings.append(Finding("deleted", expected, None,
                                               f"events {expected}..{seq - 1} are missing"))
                prev_hash = None  # the link across a gap cannot be checked
        if seq == prev_seq:
            result.findings.append(Finding("duplicated", seq, uuid, "a second event claims this position"))
            continue
        if prev_seq is not None and seq > prev_seq + 1:
            result.findings.append(Finding("deleted", prev_seq + 1, None,
                                           f"events {prev_seq + 1}..{seq - 1} are missing"))
            prev_hash = None  # the link across a gap cannot be checked
        own = link_hash(str(doc.get(PREV)), doc)
        if "_id" in doc and doc["_id"] != uuid:
            result.findings.append(Finding("modified", seq, uuid, f"stored under another id ({doc['_id']})"))
        elif own != doc[HASH]:
            original = _original_position(doc, window=reorder_window)
            if original is not None:
                result.findings.append(Finding("reordered", seq, uuid, f"was recorded at position {original}"))
            else:
                result.findings.append(Finding("modified", seq, uuid, "content does not match its chain hash"))
        elif prev_hash is not None and doc.get(PREV) != prev_hash:
            result.findings.append(Finding("reordered", seq, uuid,
                                           "does not link to the event before it (moved or inserted)"))
        prev_hash = doc[HASH]
        prev_seq = seq
        result.last_seq = seq
        result.head_hash = doc[HASH]
    if expected_last_seq is not None and (result.last_seq or 0) < expected_last_seq:
        first_missing = (result.last_seq or 0) + 1
        result.findings.append(Finding("deleted", first_missing, None,
                                       f"events {first_missing}..{expected_last_seq} are missing at the end"))
    result.findings.sort(key=lambda f: (f.seq if f.seq is not None else -1))
    return result
