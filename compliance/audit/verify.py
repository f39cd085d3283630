"""Verify the audit trail in the repository (Elasticsearch) against its hash chain and the outbox.

Reads every event of the index prefix in ``chain.seq`` order (``search_after`` pages, so memory stays
flat), recomputes the chain (compliance/audit/chain.py) and compares it with the local outbox, which
keeps every event it recorded with its chain hash:

* at every position both hold, the event in the repository must be the outbox's (same ``event.uuid``,
  same ``chain.hash``). Someone with write access to Elasticsearch who edits events and re-chains
  everything after them (recomputing ``chain.prev``/``chain.hash``) leaves a chain that is consistent
  in itself; the outbox still holds the hashes that were recorded, so each edited event is named
  (``rewritten``), and each later one whose content is as recorded but whose links were rewritten to
  follow it too (``relinked``). An event at a position the outbox never assigned is ``inserted``.
  The outbox is read alongside, one query per page of the repository (made after that page was read,
  so an event a running gateway ships meanwhile is already in the outbox), never all at once;
* the outbox knows how far the chain has been shipped, so events deleted from the end of the
  repository are found as well as those deleted from the middle.

The verdict names the first broken place and lists every finding.

Signed checkpoints (compliance/audit/checkpoints.py) are checked on the same pass: each one's
Ed25519 signature, and its RFC 6962 Merkle root recomputed from the ``chain.hash`` of the events in
its range as stored in Elasticsearch. They are what a verifier without the outbox (another machine)
relies on, and they catch a repository and an outbox rewritten together, up to the last checkpoint.
Checkpoints come from the local table when the database is reachable (and must also be in the
repository), else from the repository alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from elasticsearch import Elasticsearch
from elasticsearch import TransportError as EsTransportError
from elasticsearch.exceptions import ApiError
from sqlalchemy import Engine, bindparam, select

from compliance.audit.chain import GENESIS, HASH, PREV, SEQ, Finding, Verification, link_hash, verify_chain
from compliance.audit.checkpoints import Checkpoint, ElasticsearchCheckpoints, SqlCheckpointStore, merkle_root
from compliance.audit.documents import event_indices
from compliance.audit.interfaces import AuditSinkUnavailable
from compliance.audit.models import AuditOutboxRow
from compliance.audit.outbox import SqlAuditOutbox
from compliance.db.base import table_of

PAGE = 2000
_OUTBOX = table_of(AuditOutboxRow)


def repository_pages(client: Elasticsearch, prefix: str, *, from_seq: int = 1,
                     to_seq: int | None = None) -> Iterator[list[dict[str, Any]]]:
    """The search hits of every event document, a page at a time in chain order (``search_after``),
    after one page of those without chain fields."""
    try:
        # Documents without chain fields are insertions by someone else: list them too.
        orphans = client.search(index=event_indices(prefix), size=PAGE, ignore_unavailable=True, allow_no_indices=True,
                                query={"bool": {"must_not": {"exists": {"field": SEQ}}}})
        if orphans["hits"]["hits"]:
            yield orphans["hits"]["hits"]
        seq_range: dict[str, int] = {"gte": from_seq}
        if to_seq is not None:
            seq_range["lte"] = to_seq
        after: list[Any] | None = None
        while True:
            page = client.search(
                index=event_indices(prefix), size=PAGE, ignore_unavailable=True, allow_no_indices=True,
                query={"range": {SEQ: seq_range}}, sort=[{SEQ: {"order": "asc", "unmapped_type": "long"}},
                      {"event.uuid": {"order": "asc", "unmapped_type": "keyword"}}],
                search_after=after,
            )
            hits = page["hits"]["hits"]
            if hits:
                yield hits
            if len(hits) < PAGE:
                return
            after = hits[-1]["sort"]
    except (EsTransportError, ApiError) as exc:
        raise AuditSinkUnavailable(f"cannot read the audit repository: {exc}") from exc


def _documents(pages: Iterable[list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    for hits in pages:
        for hit in hits:
            yield {**hit["_source"], "_id": hit["_id"]}


def iter_repository(client: Elasticsearch, prefix: str, *, from_seq: int = 1,
                    to_seq: int | None = None) -> Iterator[dict[str, Any]]:
    """Every event document with its ``_id``, in chain order, plus those without chain fields first."""
    return _documents(repository_pages(client, prefix, from_seq=from_seq, to_seq=to_seq))


class OutboxComparison:
    """Compares each event of the repository, as its pages are read (in chain order), with the outbox's
    record of the same position: its event uuid and chain hash.

    One outbox query per repository page, issued after that page was read, so an event shipped by a
    running gateway meanwhile cannot look inserted; the documents are then made and checked one at a
    time. Memory: the page (read anyway) and its outbox rows.
    """

    def __init__(self, engine: Engine, *, max_listed: int = 1000) -> None:
        self._engine = engine
        self._max_listed = max_listed
        self.findings: list[Finding] = []
        #: Positions compared (an event the outbox also holds), and differing ones not listed one by one.
        self.compared = 0
        self._unlisted = 0
        self._unlisted_range: tuple[int, int] | None = None
        columns = (_OUTBOX.c.seq, _OUTBOX.c.uuid, _OUTBOX.c.prev_hash, _OUTBOX.c.hash)
        self._select = select(*columns)
        # The common case (a run of positions) as driver SQL compiled once: SQLAlchemy's result rows
        # cost as much as the database's own work for these four short columns.
        compiled = self._select.where(_OUTBOX.c.seq.between(bindparam("lo"), bindparam("hi"))).compile(
            dialect=engine.dialect)
        self._range_sql = str(compiled)
        self._range_names = tuple(compiled.positiontup or ()) if compiled.positional else None

    def documents(self, pages: Iterable[list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
        """The documents of the pages of search hits, each compared with the outbox as it goes by."""
        for hits in pages:
            seqs = [s for s in (hit["_source"].get(SEQ) for hit in hits) if isinstance(s, int)]
            rows = self._rows(sorted(seqs)) if seqs else {}
            for hit in hits:
                doc = {**hit["_source"], "_id": hit["_id"]}
                if isinstance(doc.get(SEQ), int) and isinstance(doc.get(HASH), str):
                    self._check(doc, rows)
                # else: a document without chain fields, which verify_chain names
                yield doc
        if self._unlisted and self._unlisted_range is not None:
            lo, hi = self._unlisted_range
            self.findings.append(Finding("rewritten", lo, None, f"{self._unlisted} more events at positions "
                                         f"{lo}..{hi} differ from the outbox's record (not listed one by one)"))

    def _rows(self, seqs: Sequence[int]) -> dict[int, tuple[str, str, str]]:
        """The outbox's (uuid, prev_hash, hash) at these positions (one query: a range, or a list when sparse)."""
        lo, hi = seqs[0], seqs[-1]
        if hi - lo >= 2 * len(seqs) + 64:
            with self._engine.connect() as conn:
                rows = conn.execute(self._select.where(_OUTBOX.c.seq.in_(sorted(set(seqs))))).all()
        else:
            values = {"lo": lo, "hi": hi}
            params = values if self._range_names is None else tuple(values[n] for n in self._range_names)
            with self._engine.connect() as conn:
                cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
                try:
                    cursor.execute(self._range_sql, params)
                    rows = cursor.fetchall()
                finally:
                    cursor.close()
        return {int(seq): (uuid, prev, h) for seq, uuid, prev, h in rows}

    def _check(self, doc: dict[str, Any], rows: dict[int, tuple[str, str, str]]) -> None:
        seq, uuid = doc[SEQ], doc.get("event.uuid")
        row = rows.get(seq)
        if row is None:
            self._found("inserted", seq, uuid, "the outbox holds no event at this position: it was never "
                        "recorded by a gateway")
            return
        self.compared += 1
        recorded_uuid, recorded_prev, recorded_hash = row
        if uuid != recorded_uuid:
            self._found("rewritten", seq, uuid, f"the outbox recorded event {recorded_uuid} at this position")
        elif doc[HASH] != recorded_hash:
            if doc.get(PREV) != recorded_prev and link_hash(recorded_prev, {**doc, PREV: recorded_prev}) \
                    == recorded_hash:
                self._found("relinked", seq, uuid, "content as recorded, but chain.prev/chain.hash were "
                            "rewritten to follow a changed event (the outbox recorded hash "
                            f"{recorded_hash[:16]}..., the repository holds {str(doc[HASH])[:16]}...)")
            else:
                self._found("rewritten", seq, uuid, "the event differs from the outbox's record of it: changed "
                            f"after it was recorded (the outbox recorded hash {recorded_hash[:16]}..., "
                            f"the repository holds {str(doc[HASH])[:16]}...)")

    def _found(self, kind: str, seq: int, uuid: str | None, detail: str) -> None:
        if len(self.findings) < self._max_listed:
            self.findings.append(Finding(kind, seq, uuid, detail))
            return
        self._unlisted += 1
        lo, hi = self._unlisted_range or (seq, seq)
        self._unlisted_range = (min(lo, seq), max(hi, seq))


class CheckpointTap:
    """Watches the documents of a verification go by (in chain order) and checks each checkpoint.

    Holds the leaves of one checkpoint at a time, so memory is bounded by the checkpoint size.
    """

    def __init__(self, checkpoints: list[Checkpoint], public_key: Ed25519PublicKey | None) -> None:
        self._pending = sorted(checkpoints, key=lambda c: c.seq_from)
        self._public_key = public_key
        self._leaves: list[bytes] = []
        self._last_seq: int | None = None
        self.findings: list[Finding] = []
        self.verified = 0

    def wrap(self, documents: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for doc in documents:
            self._feed(doc)
            yield doc
        while self._pending:
            self._close(self._pending.pop(0))

    def _feed(self, doc: dict[str, Any]) -> None:
        seq, chain_hash = doc.get(SEQ), doc.get(HASH)
        if not isinstance(seq, int) or not isinstance(chain_hash, str) or seq == self._last_seq:
            return
        self._last_seq = seq
        while self._pending and seq > self._pending[0].seq_to:
            self._close(self._pending.pop(0))
        if self._pending and seq >= self._pending[0].seq_from:
            try:
                self._leaves.append(bytes.fromhex(chain_hash))
            except ValueError:
                self._leaves.append(chain_hash.encode())

    def _close(self, cp: Checkpoint) -> None:
        leaves, self._leaves = self._leaves, []
        where = f"checkpoint {cp.seq_from}..{cp.seq_to}"
        if self._public_key is not None and not cp.verify_signature(self._public_key):
            self.findings.append(Finding("checkpoint", cp.seq_from, None, f"{where}: the signature does not verify"))
        elif merkle_root(leaves).hex() != cp.merkle_root:
            self.findings.append(Finding("checkpoint", cp.seq_from, None,
                                         f"{where}: the Merkle root of the {len(leaves)} stored events differs "
                                         "from the signed root (events changed, removed or re-chained)"))
        else:
            self.verified += 1


def _checkpoints(client: Elasticsearch, prefix: str, engine: Engine | None, from_seq: int,
                 to_seq: int | None) -> tuple[list[Checkpoint], list[Finding]]:
    try:
        in_repository = ElasticsearchCheckpoints(client, prefix).read(from_seq=from_seq, to_seq=to_seq)
    except (EsTransportError, ApiError) as exc:
        raise AuditSinkUnavailable(f"cannot read the audit repository: {exc}") from exc
    if engine is None:
        return in_repository, []
    local = SqlCheckpointStore(engine).all(from_seq=from_seq, to_seq=to_seq)
    findings: list[Finding] = []
    remote = {c.seq_from: c for c in in_repository}
    for cp in local:
        other = remote.get(cp.seq_from)
        if other is not None and other != cp:
            findings.append(Finding("checkpoint", cp.seq_from, None, f"checkpoint {cp.seq_from}..{cp.seq_to} "
                                    "in the repository differs from the local copy"))
    return local, findings


def verify_repository(client: Elasticsearch, prefix: str, outbox: SqlAuditOutbox | None, *,
                      from_seq: int = 1, to_seq: int | None = None, public_key: Ed25519PublicKey | None = None,
                      engine: Engine | None = None) -> Verification:
    """Verify the chain, compare it with the outbox (``outbox`` and its database ``engine``) at every
    position both hold and, when ``public_key`` is given, check the signed checkpoints in the range."""
    if outbox is not None and engine is None:
        raise ValueError("comparing the repository with the outbox needs the outbox's database engine")
    checkpoints: list[Checkpoint] = []
    cp_findings: list[Finding] = []
    if public_key is not None:
        checkpoints, cp_findings = _checkpoints(client, prefix, engine, from_seq, to_seq)
        if outbox is not None:
            # A checkpoint may cover events signed locally but not shipped yet: not checkable now.
            shipped = outbox.shipped_head()
            checkpoints = [c for c in checkpoints if c.seq_to <= shipped]
    tap = CheckpointTap(checkpoints, public_key)
    comparison = OutboxComparison(engine) if outbox is not None and engine is not None else None

    def documents(pages: Iterator[list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
        return tap.wrap(comparison.documents(pages) if comparison is not None else _documents(pages))

    result = _verify_chain_only(client, prefix, outbox, from_seq=from_seq, to_seq=to_seq, documents=documents)
    result.checkpoints = tap.verified
    found = {(f.seq, f.uuid) for f in result.findings}
    if comparison is not None:
        result.outbox_compared = comparison.compared
        # an event the chain already names (moved, duplicated) is not named twice
        result.findings.extend(f for f in comparison.findings if (f.seq, f.uuid) not in found)
    result.findings.extend(cp_findings + tap.findings)
    result.findings.sort(key=lambda f: (f.seq if f.seq is not None else -1))
    return result


def _verify_chain_only(client: Elasticsearch, prefix: str, outbox: SqlAuditOutbox | None, *,
                       from_seq: int, to_seq: int | None,
                       documents: Callable[[Iterator[list[dict[str, Any]]]], Iterator[dict[str, Any]]]
                       ) -> Verification:
    start_prev = GENESIS if from_seq == 1 else None
    expected_last: int | None = None
    if outbox is not None:
        shipped_head = outbox.shipped_head()
        expected_last = shipped_head if to_seq is None else min(shipped_head, to_seq)
        if from_seq > 1:
            start_prev = outbox.hash_at(from_seq - 1)
    return verify_chain(documents(repository_pages(client, prefix, from_seq=from_seq, to_seq=to_seq)),
                        start_prev=start_prev, expected_first_seq=from_seq, expected_last_seq=expected_last)
