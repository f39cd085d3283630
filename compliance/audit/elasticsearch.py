"""ElasticsearchAuditSink: the audit record repository (DESIGN.md "Elasticsearch").

Documents go to monthly indices ``{prefix}-YYYY.MM`` chosen by their ``@timestamp``, through the
bulk API with ``op_type=create`` and ``_id`` = the event uuid. A second delivery of the same event
(the outbox ships at least once) is answered 409 ``version_conflict_engine_exception``: that counts
as shipped, and the stored document is never overwritten, which keeps the trail tamper-evident.

Failure handling:

* the cluster cannot be reached (connection refused, timeout): :class:`AuditSinkUnavailable`,
  raised from the transport error; the whole batch stays in the outbox;
* a document is refused for what it is (400, mapping errors): listed in ``failed``, not retryable;
* a document is refused for load (429, 5xx): listed in ``failed`` and in ``retryable_ids``.

:meth:`ElasticsearchAuditSink.ensure_ready` installs the composable index template from
``audit/elasticsearch/audit-events.template.json``, replacing ``{prefix}`` with the index prefix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from elastic_transport import ConnectionError as TransportConnectionError
from elastic_transport import ConnectionTimeout, TransportError
from elasticsearch import ApiError, Elasticsearch
from elasticsearch.helpers import streaming_bulk

from compliance.audit.documents import index_name
from compliance.audit.interfaces import AuditSinkUnavailable, ShipResult
from compliance.config import PROJECT_ROOT
from compliance.errors import ConfigurationError

__all__ = ["TEMPLATE_PATH", "ElasticsearchAuditSink"]

TEMPLATE_PATH = PROJECT_ROOT / "audit" / "elasticsearch" / "audit-events.template.json"

_UNREACHABLE = (TransportConnectionError, ConnectionTimeout)
_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


def load_template(prefix: str, path: Path = TEMPLATE_PATH) -> dict[str, Any]:
    """The index template with ``{prefix}`` substituted in its index patterns."""
    template: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    template["index_patterns"] = [p.replace("{prefix}", prefix) for p in template["index_patterns"]]
    return template


class ElasticsearchAuditSink:
    """An :class:`~compliance.audit.interfaces.AuditSink` writing to Elasticsearch (client 9.x)."""

    def __init__(self, url: str, index_prefix: str, *, request_timeout: float = 10) -> None:
        if not index_prefix or index_prefix != index_prefix.lower() or "*" in index_prefix:
            raise ConfigurationError(f"invalid audit index prefix {index_prefix!r} (lowercase, no '*')")
        self.url = url
        self.index_prefix = index_prefix
        self.template_name = f"{index_prefix}-events"
        self._client = Elasticsearch(
            url, request_timeout=request_timeout, max_retries=1, retry_on_timeout=False
        )

    @property
    def client(self) -> Elasticsearch:
        return self._client

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------------ AuditSink

    def ensure_ready(self) -> None:
        """Install or update the index template (idempotent)."""
        template = load_template(self.index_prefix)
        try:
            self._client.indices.put_index_template(
                name=self.template_name,
                index_patterns=template["index_patterns"],
                priority=template.get("priority"),
                template=template["template"],
                meta=template.get("_meta"),
            )
            # A template only shapes new indices: add fields introduced since (additive only, which
            # Elasticsearch allows on live indices) to the existing monthly indices too.
            self._client.indices.put_mapping(
                index=f"{self.index_prefix}-*",
                properties=template["template"]["mappings"]["properties"],
                ignore_unavailable=True,
                allow_no_indices=True,
            )
        except _UNREACHABLE as exc:
            raise AuditSinkUnavailable(f"Elasticsearch at {self.url} is unreachable: {exc}") from exc
        except ApiError as exc:
            if exc.meta.status >= 500:
                raise AuditSinkUnavailable(f"Elasticsearch refused the index template: {exc}") from exc
            raise ConfigurationError(f"Elasticsearch refused the audit index template: {exc}") from exc
        except TransportError as exc:
            raise AuditSinkUnavailable(f"Elasticsearch transport failure: {exc}") from exc

    def ship(self, batch: Sequence[tuple[str, dict[str, Any]]]) -> ShipResult:
        """Create each document once; a duplicate uuid counts as shipped and changes nothing."""
        if not batch:
            return ShipResult()
        shipped: list[str] = []
        failed: dict[str, str] = {}
        retryable: list[str] = []
        actions = list(self._actions(batch, failed))
        if not actions:
            return ShipResult(failed=failed)
        try:
            for ok, item in streaming_bulk(
                self._client,
                actions,
                raise_on_error=False,
                raise_on_exception=True,
                max_retries=0,
                chunk_size=500,
            ):
                result = item.get("create", {})
                doc_id = str(result.get("_id"))
                status = int(result.get("status", 0))
                if ok or status == 409:
                    shipped.append(doc_id)
                    continue
                error = result.get("error", {})
                reason = error.get("reason", str(error)) if isinstance(error, dict) else str(error)
                kind = error.get("type", "error") if isinstance(error, dict) else "error"
                failed[doc_id] = f"{status} {kind}: {reason}"
                if status in _RETRYABLE_STATUS:
                    retryable.append(doc_id)
        except _UNREACHABLE as exc:
            raise AuditSinkUnavailable(f"Elasticsearch at {self.url} is unreachable: {exc}") from exc
        except ApiError as exc:
            # The bulk request itself was refused (not one document): nothing can be assumed stored.
            raise AuditSinkUnavailable(f"Elasticsearch refused the bulk request: {exc}") from exc
        except TransportError as exc:
            raise AuditSinkUnavailable(f"Elasticsearch transport failure: {exc}") from exc
        return ShipResult(
            shipped=tuple(shipped), failed=failed, retryable=bool(retryable), retryable_ids=tuple(retryable)
        )

    # ------------------------------------------------------------------ helpers

    def _actions(
        self, batch: Sequence[tuple[str, dict[str, Any]]], failed: dict[str, str]
    ) -> Iterator[dict[str, Any]]:
        for doc_id, document in batch:
            try:
                occurred_at = datetime.fromisoformat(str(document["@timestamp"]))
                index = index_name(self.index_prefix, occurred_at)
            except (KeyError, ValueError) as exc:
                failed[doc_id] = f"invalid document: no usable @timestamp ({exc})"
                continue
            yield {"_op_type": "create", "_index": index, "_id": doc_id, "_source": document}

    def refresh_for_tests(self) -> None:
        """Make every shipped document searchable now (tests only; production relies on refresh_interval)."""
        self._client.indices.refresh(index=f"{self.index_prefix}-*", allow_no_indices=True)
