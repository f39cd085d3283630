"""AuditSearch -> Elasticsearch query, the opaque cursor, and paging over a recorded client."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from compliance.audit.queries import AuditQueryService, AuditSearch, decode_cursor, encode_cursor
from compliance.errors import InvalidRequest


def test_every_filter_becomes_a_non_scoring_filter() -> None:
    q = AuditSearch(users=("alice",), patients=("P1", "P2"), studies=("1.2",), event_types=("110112",),
                    outcomes=(0, 4), source_addresses=("10.0.0.1",),
                    start=datetime(2025, 3, 1, tzinfo=UTC), end=datetime(2025, 4, 1, tzinfo=UTC)).to_query()
    filters = q["bool"]["filter"]
    assert {"terms": {"patient.ids": ["P1", "P2"]}} in filters
    assert {"terms": {"study.uids": ["1.2"]}} in filters
    assert {"terms": {"event.outcome": [0, 4]}} in filters
    assert {"terms": {"source.address": ["10.0.0.1"]}} in filters
    assert {"range": {"@timestamp": {"gte": "2025-03-01T00:00:00.000Z", "lt": "2025-04-01T00:00:00.000Z"}}} in filters
    user = filters[0]["bool"]["should"]
    assert user == [{"terms": {"user.id": ["alice"]}}, {"terms": {"user.name": ["alice"]}}]
    event = next(f for f in filters if "bool" in f and {"terms": {"event.id": ["110112"]}} in f["bool"]["should"])
    assert {"terms": {"event.type_codes": ["110112"]}} in event["bool"]["should"]
    assert AuditSearch().to_query() == {"match_all": {}}


def test_times_are_normalised_to_utc_and_must_be_aware() -> None:
    s = AuditSearch(start=datetime(2025, 3, 1, 2, 0, tzinfo=timezone(timedelta(hours=2))))
    assert s.to_query()["bool"]["filter"][0]["range"]["@timestamp"]["gte"] == "2025-03-01T00:00:00.000Z"
    with pytest.raises(InvalidRequest):
        AuditSearch(start=datetime(2025, 3, 1))
    with pytest.raises(InvalidRequest):
        AuditSearch(start=datetime(2025, 4, 1, tzinfo=UTC), end=datetime(2025, 3, 1, tzinfo=UTC))


@pytest.mark.parametrize("kwargs", [{"outcomes": (3,)}, {"users": ("",)}, {"patients": ("  ",)}])
def test_bad_filters_are_invalid_requests(kwargs) -> None:
    with pytest.raises(InvalidRequest):
        AuditSearch(**kwargs)


def test_cursor_round_trip_and_tampering() -> None:
    c = encode_cursor([1740787200000, "uuid-1"], "asc")
    assert decode_cursor(c, "asc") == [1740787200000, "uuid-1"]
    with pytest.raises(InvalidRequest):
        decode_cursor(c, "desc")  # a cursor belongs to its sort order
    for bad in ["", "@@@", "bm90IGpzb24", encode_cursor(["x", "y"], "asc")]:
        with pytest.raises(InvalidRequest):
            decode_cursor(bad, "asc")


class RecordingClient:
    """Answers search() with pages cut from a list of documents sorted like Elasticsearch would."""

    def __init__(self, docs: list[dict]) -> None:
        self.docs = sorted(docs, key=lambda d: (d["ts"], d["event.uuid"]))
        self.bodies: list[dict] = []

    def search(self, index: str, **body):
        self.bodies.append(body)
        docs = self.docs
        if "search_after" in body:
            after = tuple(body["search_after"])
            docs = [d for d in docs if (d["ts"], d["event.uuid"]) > after]
        page = docs[: body["size"]]
        return {"hits": {"total": {"value": len(self.docs), "relation": "eq"},
                         "hits": [{"_source": d, "sort": [d["ts"], d["event.uuid"]]} for d in page]}}


def test_search_after_pages_cover_everything_once() -> None:
    docs = [{"ts": 1000 + i // 2, "event.uuid": f"u{i:02d}"} for i in range(7)]  # ties on the timestamp
    client = RecordingClient(docs)
    service = AuditQueryService(client, "audit")  # type: ignore[arg-type]
    got = [d["event.uuid"] for d in service.iterate(AuditSearch(), page_size=3)]
    assert got == [f"u{i:02d}" for i in range(7)]
    assert client.bodies[0]["sort"][1] == {"event.uuid": {"order": "asc"}}
    assert "search_after" not in client.bodies[0] and client.bodies[1]["search_after"] == [1001, "u02"]
    assert len(client.bodies) == 3


def test_search_excludes_the_xml_and_validates_the_size() -> None:
    client = RecordingClient([{"ts": 1, "event.uuid": "a"}])
    service = AuditQueryService(client, "audit")  # type: ignore[arg-type]
    page = service.search(AuditSearch(), size=5)
    assert page.next_cursor is None and page.total == 1
    assert client.bodies[0]["_source"] == {"excludes": ["atna.xml"]}
    for size in (0, 1001):
        with pytest.raises(InvalidRequest):
            service.search(AuditSearch(), size=size)
