"""Reading the audit record repository: filtered search, sorting and deep paging over Elasticsearch.

:class:`AuditQueryService` turns an :class:`AuditSearch` (the privacy officer's filters) into an
Elasticsearch ``bool`` query of ``term``/``terms``/``range`` filters on the flat document fields
(``audit/elasticsearch/README.md``), sorted by ``@timestamp`` with ``event.uuid`` as the tie-breaker.

Deep paging uses ``search_after`` on that ``(@timestamp, event.uuid)`` pair, not ``from``/``size``
(which Elasticsearch caps at 10,000 hits). The pair is unique and the trail is append-only, so a
page boundary never skips or repeats an event, without a point-in-time to keep open between the
requests of a stateless gateway. The cursor handed to the caller is that pair, base64url-encoded
JSON: opaque to the caller, validated when it comes back.

Nothing here audits the read: callers (the API, the CLI) record the 110101 Audit Log Used event,
because they know who asked.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from elastic_transport import ConnectionError as TransportConnectionError
from elastic_transport import ConnectionTimeout, TlsError, TransportError
from elasticsearch import ApiError, Elasticsearch

from compliance.audit.documents import event_indices
from compliance.errors import InvalidRequest, UpstreamError, UpstreamUnavailable

__all__ = ["MAX_PAGE_SIZE", "AuditPage", "AuditQueryService", "AuditSearch", "decode_cursor", "encode_cursor"]

MAX_PAGE_SIZE = 1000
#: Page size of internal full scans (reports, detections): fewer round trips; under index.max_result_window.
SCAN_PAGE_SIZE = 5000
#: The stored fields returned by default: everything but the (large) ATNA XML body.
SOURCE_EXCLUDES = ("atna.xml",)
_OUTCOMES = frozenset({0, 4, 8, 12})


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidRequest("times must carry a timezone (e.g. 2024-03-01T00:00:00Z)")
    return value.astimezone(UTC)


def _iso(value: datetime) -> str:
    return _utc(value).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class AuditSearch:
    """The filters of a search; every given filter must match (AND), lists match any of their values."""

    #: Matches the requesting person's token subject (``user.id``) or login name (``user.name``).
    users: tuple[str, ...] = ()
    patients: tuple[str, ...] = ()
    studies: tuple[str, ...] = ()
    #: Matches EventID (``event.id``, e.g. 110112) or EventTypeCode (``event.type_codes``, e.g. 110127).
    event_types: tuple[str, ...] = ()
    outcomes: tuple[int, ...] = ()
    source_addresses: tuple[str, ...] = ()
    #: Inclusive lower bound / exclusive upper bound on ``@timestamp``.
    start: datetime | None = None
    end: datetime | None = None
    #: Extra raw filters (reports use them for fields the API does not expose as parameters).
    extra_filters: tuple[dict[str, Any], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        for name in ("users", "patients", "studies", "event_types", "source_addresses"):
            values = tuple(str(v).strip() for v in getattr(self, name))
            if any(not v for v in values):
                raise InvalidRequest(f"empty value in filter {name!r}")
            object.__setattr__(self, name, values)
        bad = [o for o in self.outcomes if o not in _OUTCOMES]
        if bad:
            raise InvalidRequest(f"outcome must be one of 0, 4, 8, 12 (got {bad[0]})")
        if self.start is not None:
            object.__setattr__(self, "start", _utc(self.start))
        if self.end is not None:
            object.__setattr__(self, "end", _utc(self.end))
        if self.start is not None and self.end is not None and self.start >= self.end:
            raise InvalidRequest("the time range is empty: 'from' must be before 'to'")

    def to_query(self) -> dict[str, Any]:
        """The Elasticsearch query: a ``bool`` of non-scoring filters."""
        filters: list[dict[str, Any]] = []
        if self.users:
            filters.append({"bool": {"should": [{"terms": {"user.id": list(self.users)}},
                                                {"terms": {"user.name": list(self.users)}}],
                                     "minimum_should_match": 1}})
        if self.patients:
            filters.append({"terms": {"patient.ids": list(self.patients)}})
        if self.studies:
            filters.append({"terms": {"study.uids": list(self.studies)}})
        if self.event_types:
            filters.append({"bool": {"should": [{"terms": {"event.id": list(self.event_types)}},
                                                {"terms": {"event.type_codes": list(self.event_types)}}],
                                     "minimum_should_match": 1}})
        if self.outcomes:
            filters.append({"terms": {"event.outcome": list(self.outcomes)}})
        if self.source_addresses:
            filters.append({"terms": {"source.address": list(self.source_addresses)}})
        if self.start is not None or self.end is not None:
            bounds: dict[str, str] = {}
            if self.start is not None:
                bounds["gte"] = _iso(self.start)
            if self.end is not None:
                bounds["lt"] = _iso(self.end)
            filters.append({"range": {"@timestamp": bounds}})
        filters.extend(self.extra_filters)
        return {"bool": {"filter": filters}} if filters else {"match_all": {}}

    def describe(self) -> str:
        """A compact, stable rendering for the 110101 event's query detail."""
        parts: dict[str, object] = {
            k: list(v) for k, v in (("user", self.users), ("patient", self.patients), ("study", self.studies),
                                    ("event_type", self.event_types), ("outcome", self.outcomes),
                                    ("source_address", self.source_addresses)) if v}
        if self.start is not None:
            parts["from"] = _iso(self.start)
        if self.end is not None:
            parts["to"] = _iso(self.end)
        return json.dumps(parts, sort_keys=True, separators=(",", ":"))


def encode_cursor(sort_values: Sequence[Any], order: str) -> str:
    raw = json.dumps({"a": list(sort_values), "o": order}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, order: str) -> list[Any]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        after = data["a"]
        ok = (isinstance(after, list) and len(after) == 2 and isinstance(after[0], int)
              and isinstance(after[1], str) and data.get("o") == order)
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise InvalidRequest("the cursor is not valid (use next_cursor from a previous page)") from exc
    if not ok:
        raise InvalidRequest("the cursor is not valid for this sort order")
    return after


@dataclass(frozen=True)
class AuditPage:
    events: list[dict[str, Any]]
    #: Pass back as ``cursor`` to get the next page; None on the last page.
    next_cursor: str | None
    #: Number of matching events (exact up to ``track_total_hits``, else a lower bound).
    total: int
    total_is_exact: bool


class AuditQueryService:
    """Searches the monthly audit indices ``{prefix}-YYYY.MM`` of one deployment (``event_indices``)."""

    def __init__(self, client: Elasticsearch, index_prefix: str) -> None:
        self._client = client
        self.index_prefix = index_prefix

    @property
    def index_pattern(self) -> str:
        return event_indices(self.index_prefix)

    def search(
        self,
        search: AuditSearch,
        *,
        size: int = 100,
        order: Literal["asc", "desc"] = "desc",
        cursor: str | None = None,
        include_xml: bool = False,
        track_total_hits: bool | int = 10_000,
        source_fields: Sequence[str] | None = None,
        _internal_size: int = 0,
    ) -> AuditPage:
        if not 1 <= size <= max(MAX_PAGE_SIZE, _internal_size):
            raise InvalidRequest(f"size must be between 1 and {MAX_PAGE_SIZE}")
        if order not in ("asc", "desc"):
            raise InvalidRequest("sort must be 'asc' or 'desc'")
        body: dict[str, Any] = {
            "query": search.to_query(),
            "size": size,
            "sort": [{"@timestamp": {"order": order, "format": "epoch_millis"}},
                     {"event.uuid": {"order": order}}],
            "track_total_hits": track_total_hits,
        }
        if source_fields is not None:
            body["_source"] = {"includes": list(source_fields)}
        elif not include_xml:
            body["_source"] = {"excludes": list(SOURCE_EXCLUDES)}
        if cursor:
            body["search_after"] = decode_cursor(cursor, order)
        resp = self._call(body)
        hits = resp["hits"]["hits"]
        total = resp["hits"].get("total") or {"value": len(hits), "relation": "eq"}
        next_cursor = None
        if len(hits) == size:
            last = hits[-1]["sort"]
            next_cursor = encode_cursor([int(last[0]), str(last[1])], order)
        return AuditPage(
            events=[hit["_source"] for hit in hits],
            next_cursor=next_cursor,
            total=int(total["value"]),
            total_is_exact=total.get("relation") == "eq",
        )

    def iterate(
        self,
        search: AuditSearch,
        *,
        order: Literal["asc", "desc"] = "asc",
        page_size: int = SCAN_PAGE_SIZE,
        source_fields: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Every matching event, page by page (reports, detections; memory bounded by the page size)."""
        cursor: str | None = None
        seen = 0
        while True:
            size = page_size if limit is None else max(1, min(page_size, limit - seen + 1))
            page = self.search(search, size=size, order=order, cursor=cursor, track_total_hits=False,
                               source_fields=source_fields, _internal_size=SCAN_PAGE_SIZE)
            for event in page.events:
                yield event
                seen += 1
                if limit is not None and seen >= limit:
                    return
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def aggregate(self, search: AuditSearch, aggs: dict[str, Any]) -> dict[str, Any]:
        """Run aggregations over the matching events (detections); returns ``aggregations``."""
        resp = self._call({"query": search.to_query(), "size": 0, "aggs": aggs, "track_total_hits": False})
        return dict(resp.get("aggregations") or {})

    def _call(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = self._client.search(index=self.index_pattern, ignore_unavailable=True, allow_no_indices=True,
                                       **body)
        except TlsError as exc:
            raise UpstreamUnavailable("the audit repository (Elasticsearch) is unreachable: the TLS handshake failed "
                                      "(is its certificate signed by COMPLIANCE_ELASTICSEARCH_CA_FILE?)") from exc
        except (TransportConnectionError, ConnectionTimeout) as exc:
            raise UpstreamUnavailable("the audit repository (Elasticsearch) is unreachable") from exc
        except ApiError as exc:
            if exc.meta.status == 400:
                raise InvalidRequest("the audit repository refused the query",
                                     detail={"reason": str(exc.message)[:500]}) from exc
            if exc.meta.status in (401, 403):
                raise UpstreamError(
                    f"the audit repository refused the gateway's credentials ({exc.meta.status})") from exc
            raise UpstreamError(f"the audit repository answered {exc.meta.status}") from exc
        except TransportError as exc:
            raise UpstreamUnavailable("the audit repository (Elasticsearch) failed") from exc
        return dict(resp.body if hasattr(resp, "body") else resp)
