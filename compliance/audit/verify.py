"""Verify the audit trail in the repository (Elasticsearch) against its hash chain.

Reads every event of the index prefix in ``chain.seq`` order (``search_after`` pages, so memory stays
flat), recomputes the chain (compliance/audit/chain.py) and compares its end with the local outbox:
the outbox knows how far the chain has been shipped, so events deleted from the end of the repository
are found as well as those deleted from the middle. The verdict names the first broken place.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from elasticsearch import Elasticsearch
from elasticsearch import TransportError as EsTransportError
from elasticsearch.exceptions import ApiError

from compliance.audit.chain import GENESIS, SEQ, Verification, verify_chain
from compliance.audit.interfaces import AuditSinkUnavailable
from compliance.audit.outbox import SqlAuditOutbox

PAGE = 2000


def iter_repository(client: Elasticsearch, prefix: str, *, from_seq: int = 1,
                    to_seq: int | None = None) -> Iterator[dict[str, Any]]:
    """Every event document with its ``_id``, in chain order, plus those without chain fields first."""
    try:
        # Documents without chain fields are insertions by someone else: list them too.
        orphans = client.search(index=f"{prefix}-*", size=PAGE, ignore_unavailable=True, allow_no_indices=True,
                                query={"bool": {"must_not": {"exists": {"field": SEQ}}}})
        for hit in orphans["hits"]["hits"]:
            yield {**hit["_source"], "_id": hit["_id"]}
        seq_range: dict[str, int] = {"gte": from_seq}
        if to_seq is not None:
            seq_range["lte"] = to_seq
        after: list[Any] | None = None
        while True:
            page = client.search(
                index=f"{prefix}-*", size=PAGE, ignore_unavailable=True, allow_no_indices=True,
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


def verify_repository(client: Elasticsearch, prefix: str, outbox: SqlAuditOutbox | None, *,
                      from_seq: int = 1, to_seq: int | None = None) -> Verification:
    start_prev = GENESIS if from_seq == 1 else None
    expected_last: int | None = None
    if outbox is not None:
        shipped_head = outbox.shipped_head()
        expected_last = shipped_head if to_seq is None else min(shipped_head, to_seq)
        if from_seq > 1:
            start_prev = outbox.hash_at(from_seq - 1)
    return verify_chain(iter_repository(client, prefix, from_seq=from_seq, to_seq=to_seq),
                        start_prev=start_prev, expected_first_seq=from_seq, expected_last_seq=expected_last)
