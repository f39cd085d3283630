"""Verify the audit trail in the repository (Elasticsearch) against its hash chain.

Reads every event of the index prefix in ``chain.seq`` order (``search_after`` pages, so memory stays
flat), recomputes the chain (compliance/audit/chain.py) and compares its end with the local outbox:
the outbox knows how far the chain has been shipped, so events deleted from the end of the repository
are found as well as those deleted from the middle. The verdict names the first broken place.

Signed checkpoints (compliance/audit/checkpoints.py) are checked on the same pass: each one's
Ed25519 signature, and its RFC 6962 Merkle root recomputed from the ``chain.hash`` of the events in
its range as stored in Elasticsearch. This catches what the chain alone cannot: a repository whose
chain was recomputed consistently after tampering. Checkpoints come from the local table when the
database is reachable (and must also be in the repository), else from the repository alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from elasticsearch import Elasticsearch
from elasticsearch import TransportError as EsTransportError
from elasticsearch.exceptions import ApiError

from compliance.audit.chain import GENESIS, HASH, SEQ, Finding, Verification, verify_chain
from compliance.audit.checkpoints import Checkpoint, ElasticsearchCheckpoints, SqlCheckpointStore, merkle_root
from compliance.audit.documents import event_indices
from compliance.audit.interfaces import AuditSinkUnavailable
from compliance.audit.outbox import SqlAuditOutbox

PAGE = 2000


def iter_repository(client: Elasticsearch, prefix: str, *, from_seq: int = 1,
                    to_seq: int | None = None) -> Iterator[dict[str, Any]]:
    """Every event document with its ``_id``, in chain order, plus those without chain fields first."""
    try:
        # Documents without chain fields are insertions by someone else: list them too.
        orphans = client.search(index=event_indices(prefix), size=PAGE, ignore_unavailable=True, allow_no_indices=True,
                                query={"bool": {"must_not": {"exists": {"field": SEQ}}}})
        for hit in orphans["hits"]["hits"]:
            yield {**hit["_source"], "_id": hit["_id"]}
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
            for hit in hits:
                yield {**hit["_source"], "_id": hit["_id"]}
            if len(hits) < PAGE:
                return
            after = hits[-1]["sort"]
    except (EsTransportError, ApiError) as exc:
        raise AuditSinkUnavailable(f"cannot read the audit repository: {exc}") from exc


class CheckpointTap:
    """Watches the documents of a verification go by (in chain order) and checks each checkpoint.

    Holds the leaves of one checkpoint at a time, so memory is bounded by the checkpoint size.
    """

    def __init__(self, checkpoints: list[Checkpoint], public_key: Any | None) -> None:
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


def _checkpoints(client: Elasticsearch, prefix: str, engine: Any | None, from_seq: int,
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
                      from_seq: int = 1, to_seq: int | None = None, public_key: Any | None = None,
                      engine: Any | None = None) -> Verification:
    """Verify the chain and, when ``public_key`` is given, the signed checkpoints in the range."""
    checkpoints: list[Checkpoint] = []
    cp_findings: list[Finding] = []
    if public_key is not None:
        checkpoints, cp_findings = _checkpoints(client, prefix, engine, from_seq, to_seq)
        if outbox is not None:
            # A checkpoint may cover events signed locally but not shipped yet: not checkable now.
            shipped = outbox.shipped_head()
            checkpoints = [c for c in checkpoints if c.seq_to <= shipped]
    tap = CheckpointTap(checkpoints, public_key)
    result = _verify_chain_only(client, prefix, outbox, from_seq=from_seq, to_seq=to_seq, wrap=tap.wrap)
    result.checkpoints = tap.verified
    result.findings.extend(cp_findings + tap.findings)
    result.findings.sort(key=lambda f: (f.seq if f.seq is not None else -1))
    return result


def _verify_chain_only(client: Elasticsearch, prefix: str, outbox: SqlAuditOutbox | None, *,
                       from_seq: int, to_seq: int | None, wrap: Any) -> Verification:
    start_prev = GENESIS if from_seq == 1 else None
    expected_last: int | None = None
    if outbox is not None:
        shipped_head = outbox.shipped_head()
        expected_last = shipped_head if to_seq is None else min(shipped_head, to_seq)
        if from_seq > 1:
            start_prev = outbox.hash_at(from_seq - 1)
    return verify_chain(wrap(iter_repository(client, prefix, from_seq=from_seq, to_seq=to_seq)),
                        start_prev=start_prev, expected_first_seq=from_seq, expected_last_seq=expected_last)
