"""ElasticsearchAuditSink's bulk body and response handling, against a fake client (no network).

The real cluster is exercised by tests/integration/test_elasticsearch_sink.py; here: the NDJSON the
sink builds (stored text sent unchanged, one action line per document), splitting, and how every
item of a bulk response is accounted for.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import orjson
import pytest
from elastic_transport import ConnectionError as TransportConnectionError

from compliance.audit.chain import GENESIS, extend_serialized
from compliance.audit.elasticsearch import ElasticsearchAuditSink, document_timestamp
from compliance.audit.es_client import PrebuiltNdjson as _PrebuiltNdjson
from compliance.audit.interfaces import AuditSinkUnavailable


class FakeClient:
    def __init__(self, respond=None) -> None:
        self.bodies: list[bytes] = []
        self.params: list[dict] = []
        self.respond = respond

    def bulk(self, *, operations, **params):
        assert isinstance(operations, bytes)
        self.bodies.append(operations)
        self.params.append(params)
        lines = operations.split(b"\n")
        assert lines[-1] == b""
        actions = [json.loads(a) for a in lines[0:-1:2]]
        if self.respond is not None:
            return SimpleNamespace(body=self.respond(actions))
        return SimpleNamespace(body={"errors": False, "items": [
            {"create": {"_id": a["create"]["_id"], "status": 201}} for a in actions]})

    def close(self):
        pass


@pytest.fixture
def sink():
    s = ElasticsearchAuditSink("http://127.0.0.1:1", "audit-x")
    s._client = FakeClient()
    return s


def chained(n: int, start: int = 0) -> list[tuple[str, str]]:
    docs = [{"@timestamp": f"2026-11-{28 + (i % 3):02d}T23:59:59.999Z", "event.uuid": f"u{i}",
             "patient.names": ["山田^太郎"], "atna.xml": '<a b="1">\n</a>'} for i in range(start, start + n)]
    _, _, texts = extend_serialized(0, GENESIS, docs)
    return [(d["event.uuid"], t) for d, t in zip(docs, texts, strict=True)]


def test_document_timestamp_reads_the_first_key_of_canonical_json_and_falls_back():
    _, text = chained(1)[0]
    assert document_timestamp(text) == "2026-11-28T23:59:59.999Z"
    assert document_timestamp('{"b": 1, "@timestamp": "2026-01-02T00:00:00Z"}') == "2026-01-02T00:00:00Z"
    assert document_timestamp('{"@timestamp":"2026-\\u00301-02T00:00:00Z"}') == "2026-01-02T00:00:00Z"
    with pytest.raises(KeyError):
        document_timestamp('{"a": 1}')
    with pytest.raises(ValueError):
        document_timestamp("not json")


def test_stored_text_goes_out_unchanged_after_its_action_line(sink):
    batch = chained(5)
    result = sink.ship_serialized(batch)
    assert result.shipped == tuple(u for u, _ in batch) and not result.failed
    (body,) = sink.client.bodies
    lines = body.split(b"\n")[:-1]
    assert len(lines) == 10
    for (uuid, text), action, source in zip(batch, lines[0::2], lines[1::2], strict=True):
        month = json.loads(text)["@timestamp"][:7].replace("-", ".")
        assert json.loads(action) == {"create": {"_index": f"audit-x-{month}", "_id": uuid}}
        assert source == text.encode("utf-8")
    assert "refresh" not in sink.client.params[0]  # no refresh forced per bulk
    assert sink.client.params[0]["filter_path"]


def test_dict_documents_are_serialised_once_with_the_same_result(sink):
    batch = chained(3)
    sink.ship([(u, orjson.loads(t)) for u, t in batch])
    sink.ship_serialized(batch)
    first, second = sink.client.bodies
    assert [json.loads(x) for x in first.split(b"\n")[:-1]] == [json.loads(x) for x in second.split(b"\n")[:-1]]


def test_a_document_without_a_usable_timestamp_fails_alone(sink):
    good = chained(2)
    bad = [("nots", '{"event.uuid": "nots"}'), ("naive", '{"@timestamp": "2026-11-28T10:00:00"}'),
           ("broken", '{"@timestamp": "2026-11-28T10:00:00Z", ')]
    result = sink.ship_serialized([good[0], *bad, good[1]])
    assert result.shipped == (good[0][0], good[1][0])
    assert set(result.failed) == {"nots", "naive", "broken"} and not result.retryable
    assert sink.client.bodies[0].count(b"\n") == 4


def test_multi_line_text_is_reserialised_so_it_cannot_break_the_framing(sink):
    text = '{\n  "@timestamp": "2026-11-28T10:00:00Z",\n  "event.uuid": "m"\n}'
    sink.ship_serialized([("m", text)])
    lines = sink.client.bodies[0].split(b"\n")[:-1]
    assert len(lines) == 2 and json.loads(lines[1]) == json.loads(text)


def test_a_batch_is_split_only_above_max_bulk_bytes(sink):
    batch = chained(10)
    sink.ship_serialized(batch)
    assert len(sink.client.bodies) == 1
    sink.max_bulk_bytes = 2 * max(len(t) for _, t in batch) + 400
    result = sink.ship_serialized(batch)
    assert len(sink.client.bodies) == 1 + 5
    assert result.shipped == tuple(u for u, _ in batch)
    sink.max_bulk_bytes = 10  # smaller than one document: still one per request
    sink.ship_serialized(batch[:3])
    assert len(sink.client.bodies) == 1 + 5 + 3


def test_every_item_of_a_bulk_response_is_accounted_for(sink):
    def respond(actions):
        statuses = [201, 409, 400, 429, 503]
        items = []
        for a, status in zip(actions, statuses, strict=True):
            item = {"_id": a["create"]["_id"], "status": status}
            if status >= 400 and status != 409:
                item["error"] = {"type": f"t{status}", "reason": f"r{status}"}
            elif status == 409:
                item["error"] = {"type": "version_conflict_engine_exception", "reason": "exists"}
            items.append({"create": item})
        return {"errors": True, "items": items}

    sink._client = FakeClient(respond)
    batch = chained(5)
    ids = [u for u, _ in batch]
    result = sink.ship_serialized(batch)
    assert result.shipped == (ids[0], ids[1])  # created, and already there (a re-delivery)
    assert set(result.failed) == {ids[2], ids[3], ids[4]}
    assert result.failed[ids[2]].startswith("400 t400")
    assert set(result.retryable_ids) == {ids[3], ids[4]} and result.retryable


def test_a_response_that_does_not_match_the_request_is_not_trusted(sink):
    sink._client = FakeClient(lambda actions: {"errors": False, "items": []})
    with pytest.raises(AuditSinkUnavailable):
        sink.ship_serialized(chained(2))

    def swapped(actions):
        items = [{"create": {"_id": a["create"]["_id"], "status": 400, "error": {"type": "x"}}}
                 for a in reversed(actions)]
        return {"errors": True, "items": items}

    sink._client = FakeClient(swapped)
    with pytest.raises(AuditSinkUnavailable):
        sink.ship_serialized(chained(2))


def test_an_unreachable_cluster_is_unavailable_not_failed(sink):
    class Down(FakeClient):
        def bulk(self, *, operations, **params):
            raise TransportConnectionError("refused")

    sink._client = Down()
    with pytest.raises(AuditSinkUnavailable):
        sink.ship_serialized(chained(1))


def test_index_names_follow_the_utc_month_of_each_document(sink):
    assert sink._index_for("2026-11-30T23:59:59.999Z") == "audit-x-2026.11"
    assert sink._index_for("2026-12-01T00:30:00+01:00") == "audit-x-2026.11"  # 23:30 UTC
    assert sink._index_for("2026-12-01T00:00:00.000Z") == "audit-x-2026.12"
    with pytest.raises(ValueError):
        sink._index_for("2026-11-30T10:00:00")  # naive


def test_the_ndjson_serializer_passes_a_prebuilt_body_through():
    ser = _PrebuiltNdjson()
    body = b'{"create":{}}\n{"a":1}\n'
    assert ser.dumps(body) is body
    assert ser.dumps([{"a": 1}, b'{"b":2}']) == b'{"a":1}\n{"b":2}\n'


def test_only_what_an_existing_index_lacks_is_added_to_it():
    from compliance.audit.elasticsearch import additive_properties

    wanted = {"chain": {"properties": {"seq": {"type": "long"},
                                       "hash": {"type": "keyword", "index": False, "doc_values": False},
                                       "new": {"type": "keyword"}}},
              "event": {"properties": {"id": {"type": "keyword"}}},
              "fresh": {"type": "long"}}
    existing = {"chain": {"properties": {"seq": {"type": "long"}, "hash": {"type": "keyword"}}},
                "event": {"properties": {"id": {"type": "keyword"}}}}
    assert additive_properties(wanted, existing) == {"chain": {"properties": {"new": {"type": "keyword"}}},
                                                     "fresh": {"type": "long"}}
    assert additive_properties(wanted, {}) == wanted
    assert additive_properties(existing, wanted) == {}
