"""ElasticsearchAuditSink: the audit record repository (docs/design.md "The audit pipeline").

Documents go to monthly indices ``{prefix}-YYYY.MM`` chosen by their ``@timestamp``, through the
bulk API with ``op_type=create`` and ``_id`` = the event uuid. A second delivery of the same event
(the outbox ships at least once) is answered 409 ``version_conflict_engine_exception``: that counts
as shipped, and the stored document is never overwritten, which keeps the trail tamper-evident.

The request body is NDJSON built as bytes here and sent with the client's ``bulk`` API (no per-action
serialisation by ``elasticsearch.helpers``). :meth:`ElasticsearchAuditSink.ship_serialized` takes the
documents as the outbox stored them (JSON text, serialised once when the event was recorded) and sends
that text unchanged; :meth:`ElasticsearchAuditSink.ship` serialises dicts with orjson. A batch is one
bulk request, split only above ``max_bulk_bytes``. No ``refresh`` is forced: documents become
searchable on the index's own refresh schedule (``audit/elasticsearch/README.md``).

Failure handling:

* the cluster cannot be reached (connection refused, timeout, a certificate that does not verify)
  or refuses the gateway's credentials (401, 403): :class:`AuditSinkUnavailable`, raised from the
  transport or API error; the whole batch stays in the outbox;
* a document is refused for what it is (400, mapping errors): listed in ``failed``, not retryable;
* a document is refused for load (429, 5xx): listed in ``failed`` and in ``retryable_ids``.

:meth:`ElasticsearchAuditSink.ensure_ready` installs the composable index template from
``audit/elasticsearch/audit-events.template.json``, replacing ``{prefix}`` with the index prefix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from elastic_transport import ConnectionError as TransportConnectionError
from elastic_transport import ConnectionTimeout, TransportError
from elasticsearch import ApiError, Elasticsearch

from compliance.audit.documents import event_indices, index_name
from compliance.audit.es_client import connect
from compliance.audit.interfaces import AuditSinkUnavailable, ShipResult
from compliance.config import PROJECT_ROOT
from compliance.errors import ConfigurationError

__all__ = ["TEMPLATE_PATH", "ElasticsearchAuditSink", "document_timestamp"]

TEMPLATE_PATH = PROJECT_ROOT / "audit" / "elasticsearch" / "audit-events.template.json"

_UNREACHABLE = (TransportConnectionError, ConnectionTimeout)
_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
#: Only what is needed to account for each document (the full bulk response echoes index, version,
#: shards and sequence numbers per document).
_BULK_FILTER = "errors,items.*._id,items.*.status,items.*.error.type,items.*.error.reason"
_TS_PREFIX = '{"@timestamp":"'
_UTC_OFFSET = timedelta(0)


def document_timestamp(text: str) -> str:
    """``@timestamp`` of a document stored as JSON text, without parsing the whole document.

    The outbox stores canonical JSON (sorted keys, compliance/audit/chain.py), where ``@timestamp``
    is the first key; anything else (older rows, escapes in the value) takes the full parse.
    Raises KeyError or ValueError when there is no usable ``@timestamp``.
    """
    if text.startswith(_TS_PREFIX):
        end = text.find('"', len(_TS_PREFIX))
        value = text[len(_TS_PREFIX):end]
        if end > 0 and "\\" not in value:
            return value
    document = orjson.loads(text)
    if not isinstance(document, dict):
        raise ValueError("the document is not a JSON object")
    return str(document["@timestamp"])


def load_template(prefix: str, path: Path = TEMPLATE_PATH) -> dict[str, Any]:
    """The index template with ``{prefix}`` substituted in its index patterns."""
    template: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    template["index_patterns"] = [p.replace("{prefix}", prefix) for p in template["index_patterns"]]
    return template


def additive_properties(wanted: Mapping[str, Any], existing: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``wanted`` (a mapping's ``properties``) that ``existing`` lacks: new fields, and new
    sub-fields of objects that both have. Fields both have are left out, whatever their parameters."""
    out: dict[str, Any] = {}
    for name, spec in wanted.items():
        have = existing.get(name)
        if have is None:
            out[name] = spec
        elif isinstance(spec, Mapping) and "properties" in spec and isinstance(have, Mapping) and "properties" in have:
            sub = additive_properties(spec["properties"], have["properties"])
            if sub:
                out[name] = {"properties": sub}
    return out


class ElasticsearchAuditSink:
    """An :class:`~compliance.audit.interfaces.AuditSink` writing to Elasticsearch (client 9.x).

    The composition root (:mod:`compliance.wiring`) hands it the client it built from the settings (TLS and
    credentials, :mod:`compliance.audit.es_client`). Given a URL alone it connects without credentials
    (tools and tests against a lab's plain endpoint).
    """

    def __init__(self, url: str, index_prefix: str, *, client: Elasticsearch | None = None,
                 request_timeout: float = 10, max_bulk_bytes: int = 16 * 1024 * 1024) -> None:
        if not index_prefix or index_prefix != index_prefix.lower() or "*" in index_prefix:
            raise ConfigurationError(f"invalid audit index prefix {index_prefix!r} (lowercase, no '*')")
        self.url = url
        self.index_prefix = index_prefix
        self.template_name = f"{index_prefix}-events"
        self.max_bulk_bytes = max_bulk_bytes
        #: A client handed in belongs to whoever built it (the app closes the one it shares).
        self._owns_client = client is None
        self._client = client if client is not None else connect(url, request_timeout=request_timeout)
        self._month_index: dict[tuple[int, int], str] = {}

    @property
    def client(self) -> Elasticsearch:
        return self._client

    def close(self) -> None:
        if self._owns_client:
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
            # A template only shapes new indices: add the fields introduced since to the existing
            # monthly indices too. Only what an index lacks is sent: a field it already has keeps
            # the parameters it was created with (Elasticsearch refuses to change most of them on a
            # live index, e.g. chain.hash losing its index and doc values), and the template gives
            # the next month's index the new ones.
            wanted = template["template"]["mappings"]["properties"]
            existing = self._client.indices.get_mapping(
                index=f"{self.index_prefix}-*", ignore_unavailable=True, allow_no_indices=True)
            monthly = re.compile(rf"{re.escape(self.index_prefix)}-\d{{4}}\.\d{{2}}")
            for index, body in sorted(dict(existing).items()):
                if not monthly.fullmatch(index):
                    continue  # e.g. another deployment's "{prefix}-staging-..." indices: not ours to change
                missing = additive_properties(wanted, (body.get("mappings") or {}).get("properties") or {})
                if missing:
                    self._client.indices.put_mapping(index=index, properties=missing)
        except _UNREACHABLE as exc:
            raise AuditSinkUnavailable(f"Elasticsearch at {self.url} is unreachable: {exc}") from exc
        except ApiError as exc:
            if exc.meta.status in (401, 403):
                # wrong or revoked credentials: the events wait in the outbox until they are mended
                raise AuditSinkUnavailable(f"Elasticsearch at {self.url} refused the gateway's credentials "
                                           f"({exc.meta.status}): {exc}") from exc
            if exc.meta.status >= 500:
                raise AuditSinkUnavailable(f"Elasticsearch refused the index template: {exc}") from exc
            raise ConfigurationError(f"Elasticsearch refused the audit index template: {exc}") from exc
        except TransportError as exc:
            raise AuditSinkUnavailable(f"Elasticsearch transport failure: {exc}") from exc

    def ship(self, batch: Sequence[tuple[str, dict[str, Any]]]) -> ShipResult:
        """Create each document once; a duplicate uuid counts as shipped and changes nothing."""
        failed: dict[str, str] = {}
        lines: list[tuple[str, bytes]] = []
        for doc_id, document in batch:
            try:
                index = self._index_for(str(document["@timestamp"]))
            except (KeyError, ValueError) as exc:
                failed[doc_id] = f"invalid document: no usable @timestamp ({exc})"
                continue
            try:
                body = orjson.dumps(document)
            except TypeError:  # what orjson refuses (a lone surrogate, a huge integer): the stdlib can
                body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode(
                    "utf-8", "surrogatepass")
            lines.append((doc_id, self._action(index, doc_id) + body + b"\n"))
        return self._bulk(lines, failed)

    def ship_serialized(self, batch: Sequence[tuple[str, str]]) -> ShipResult:
        """:meth:`ship` for documents already serialised as JSON text (the outbox's stored text).

        The text is sent as it is: no parse, no second serialisation. Only its ``@timestamp`` is read
        (for the monthly index). A text that spans several lines (not written by this project's outbox,
        which stores single-line JSON) is re-serialised so it cannot break the NDJSON framing.
        """
        failed: dict[str, str] = {}
        lines: list[tuple[str, bytes]] = []
        for doc_id, text in batch:
            try:
                index = self._index_for(document_timestamp(text))
                multiline = "\n" in text or "\r" in text
                body = orjson.dumps(orjson.loads(text)) if multiline else text.encode("utf-8")
            except (KeyError, ValueError, TypeError) as exc:
                failed[doc_id] = f"invalid document: {type(exc).__name__}: {exc}"
                continue
            lines.append((doc_id, self._action(index, doc_id) + body + b"\n"))
        return self._bulk(lines, failed)

    # ------------------------------------------------------------------ helpers

    def _index_for(self, timestamp: str) -> str:
        """The monthly index of an ``@timestamp`` value (ValueError when it is not an aware ISO time)."""
        occurred_at = datetime.fromisoformat(timestamp)
        if occurred_at.utcoffset() != _UTC_OFFSET:  # None (naive: refused) or another offset
            return index_name(self.index_prefix, occurred_at)
        month = (occurred_at.year, occurred_at.month)
        index = self._month_index.get(month)
        if index is None:
            index = self._month_index[month] = index_name(self.index_prefix, occurred_at)
        return index

    @staticmethod
    def _action(index: str, doc_id: str) -> bytes:
        return orjson.dumps({"create": {"_index": index, "_id": doc_id}}) + b"\n"

    def _bulk(self, lines: Sequence[tuple[str, bytes]], failed: dict[str, str]) -> ShipResult:
        shipped: list[str] = []
        retryable: list[str] = []
        start = 0
        while start < len(lines):
            # One request per batch; split only when the body would exceed max_bulk_bytes.
            end, size = start, 0
            while end < len(lines) and (end == start or size + len(lines[end][1]) <= self.max_bulk_bytes):
                size += len(lines[end][1])
                end += 1
            self._send(lines[start:end], shipped, failed, retryable)
            start = end
        return ShipResult(
            shipped=tuple(shipped), failed=failed, retryable=bool(retryable), retryable_ids=tuple(retryable)
        )

    def _send(self, chunk: Sequence[tuple[str, bytes]], shipped: list[str], failed: dict[str, str],
              retryable: list[str]) -> None:
        try:
            # the stubs want a sequence of mappings; the client sends bytes (NDJSON lines) as they are
            response = self._client.bulk(operations=b"".join(line for _, line in chunk),  # type: ignore[arg-type]
                                         filter_path=_BULK_FILTER)
        except _UNREACHABLE as exc:
            raise AuditSinkUnavailable(f"Elasticsearch at {self.url} is unreachable: {exc}") from exc
        except ApiError as exc:
            # The bulk request itself was refused (not one document): nothing can be assumed stored.
            raise AuditSinkUnavailable(f"Elasticsearch refused the bulk request: {exc}") from exc
        except TransportError as exc:
            raise AuditSinkUnavailable(f"Elasticsearch transport failure: {exc}") from exc
        body = response.body
        items = body.get("items") or []
        if len(items) != len(chunk):
            raise AuditSinkUnavailable(f"Elasticsearch answered {len(items)} bulk items for {len(chunk)} documents")
        if not body.get("errors"):
            shipped.extend(doc_id for doc_id, _ in chunk)
            return
        # Items come back in request order (the bulk API guarantees it); the id is checked anyway.
        for (doc_id, _), item in zip(chunk, items, strict=True):
            result = item.get("create", {})
            if str(result.get("_id")) != doc_id:
                raise AuditSinkUnavailable(f"Elasticsearch answered bulk items out of order ({doc_id})")
            status = int(result.get("status", 0))
            if 200 <= status < 300 or status == 409:
                shipped.append(doc_id)
                continue
            error = result.get("error", {})
            reason = error.get("reason", str(error)) if isinstance(error, dict) else str(error)
            kind = error.get("type", "error") if isinstance(error, dict) else "error"
            failed[doc_id] = f"{status} {kind}: {reason}"
            if status in _RETRYABLE_STATUS:
                retryable.append(doc_id)

    def refresh_for_tests(self) -> None:
        """Make every shipped document searchable now (tests only; production relies on refresh_interval)."""
        self._client.indices.refresh(index=event_indices(self.index_prefix), allow_no_indices=True)
