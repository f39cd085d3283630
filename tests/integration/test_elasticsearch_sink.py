"""ElasticsearchAuditSink against the real Elasticsearch of the local stack (deploy/local/up)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from compliance.audit.atna import AuditSource, validate_atna_xml
from compliance.audit.codes import Action, EventTypeCode, Outcome
from compliance.audit.documents import index_name, to_document
from compliance.audit.elasticsearch import ElasticsearchAuditSink
from compliance.audit.events import instances_accessed_event, query_event, security_alert_event
from compliance.audit.interfaces import AuditSinkUnavailable
from compliance.audit.message import PatientRef, StudyRef, UserRef

pytestmark = pytest.mark.integration

URL = os.environ.get("COMPLIANCE_ELASTICSEARCH_URL", "http://127.0.0.1:9200")
SOURCE = AuditSource("compliance-gateway-it", "it-site")
USER = UserRef("it-sub", "itest", "it-client", ("radiologist",), "10.9.8.7")


@pytest.fixture()
def sink() -> Iterator[ElasticsearchAuditSink]:
    prefix = f"it-audit-{uuid.uuid4().hex[:12]}"
    sink = ElasticsearchAuditSink(URL, prefix, request_timeout=30)
    try:
        sink.client.cluster.health()
    except Exception as exc:  # the stack is not running: say so, don't fake it
        pytest.skip(f"Elasticsearch not reachable at {URL}: {exc}")
    try:
        yield sink
    finally:
        # Deleting by wildcard is refused by default (action.destructive_requires_name): name them.
        names = list(sink.client.indices.get(index=f"{prefix}-*", allow_no_indices=True))
        if names:
            sink.client.indices.delete(index=",".join(names))
        _delete_template(sink)
        sink.close()


def _delete_template(sink: ElasticsearchAuditSink) -> None:
    if sink.client.indices.exists_index_template(name=sink.template_name):
        sink.client.indices.delete_index_template(name=sink.template_name)


def _events(patient_id: str) -> list:
    patient = PatientRef(patient_id, "Yamada^Tarou=山田^太郎 <&>")
    study = StudyRef(f"2.25.{uuid.uuid4().int}", {"1.2.840.10008.5.1.4.1.1.2": 7}, "ACC-1")
    return [
        query_event(
            user=USER, gateway_id="gw", outcome=Outcome.SUCCESS, query=b"PatientID=" + patient_id.encode(),
            sop_class_uid=None, patients=[patient],
        ),
        instances_accessed_event(
            user=USER, gateway_id="gw", action=Action.READ, outcome=Outcome.SUCCESS,
            patients=[patient], studies=[study],
        ),
        security_alert_event(
            user=None, gateway_id="gw", alert_type=EventTypeCode.AUTHENTICATION_DECISION,
            description="bad token", resource="/dicom-web/studies", source_address="203.0.113.1",
            alternative_user_id="claimed-user",
        ),
    ]


def test_template_installed(sink: ElasticsearchAuditSink) -> None:
    sink.ensure_ready()
    sink.ensure_ready()  # idempotent
    response = sink.client.indices.get_index_template(name=sink.template_name)
    (entry,) = response["index_templates"]
    assert entry["index_template"]["index_patterns"] == [f"{sink.index_prefix}-{d}*" for d in range(10)]
    properties = entry["index_template"]["template"]["mappings"]["properties"]
    assert properties["patient"]["properties"]["ids"]["type"] == "keyword"


def test_ship_twice_is_idempotent_and_searchable(sink: ElasticsearchAuditSink) -> None:
    sink.ensure_ready()
    patient_id = f"IT-{uuid.uuid4().hex[:8]}"
    events = _events(patient_id)
    batch = [(e.uuid, to_document(e, SOURCE)) for e in events]

    first = sink.ship(batch)
    assert set(first.shipped) == {e.uuid for e in events}
    assert not first.failed

    # Tamper with the copy being re-delivered: the stored document must not change.
    redelivered = [(doc_id, {**doc, "event.outcome_description": "overwritten"}) for doc_id, doc in batch]
    second = sink.ship(redelivered)
    assert set(second.shipped) == {e.uuid for e in events}
    assert not second.failed
    sink.refresh_for_tests()

    for event in events:
        hits = sink.client.search(
            index=f"{sink.index_prefix}-*", query={"term": {"event.uuid": event.uuid}}
        )["hits"]
        assert hits["total"]["value"] == 1
        assert hits["hits"][0]["_index"] == index_name(sink.index_prefix, event.occurred_at)
        assert hits["hits"][0]["_source"]["event.outcome_description"] != "overwritten"

    by_patient = sink.client.search(
        index=f"{sink.index_prefix}-*", query={"term": {"patient.ids": patient_id}}
    )["hits"]
    assert by_patient["total"]["value"] == 2
    assert {h["_source"]["event.id"] for h in by_patient["hits"]} == {"110112", "110103"}

    roles = sink.client.search(
        index=f"{sink.index_prefix}-*",
        query={
            "bool": {
                "filter": [{"terms": {"user.roles": ["radiologist"]}}, {"term": {"event.id": "110103"}}]
            }
        },
    )["hits"]
    assert roles["total"]["value"] == 1

    stored = sink.client.get(index=index_name(sink.index_prefix, events[1].occurred_at), id=events[1].uuid)
    xml = stored["_source"]["atna.xml"].encode("utf-8")
    validate_atna_xml(xml)
    assert "山田".encode() in xml


def test_index_follows_event_month(sink: ElasticsearchAuditSink) -> None:
    sink.ensure_ready()
    old = instances_accessed_event(
        user=USER, gateway_id="gw", action=Action.READ, outcome=Outcome.SUCCESS,
        patients=[], studies=[StudyRef("1.2.3")], occurred_at=datetime(2023, 12, 31, 23, 0, tzinfo=UTC),
    )
    result = sink.ship([(old.uuid, to_document(old, SOURCE))])
    assert result.shipped == (old.uuid,)
    assert sink.client.exists(index=f"{sink.index_prefix}-2023.12", id=old.uuid)


def test_document_refused_for_content_is_failed_not_retryable(sink: ElasticsearchAuditSink) -> None:
    sink.ensure_ready()
    event = _events("IT-bad")[0]
    bad = {**to_document(event, SOURCE), "event.outcome": "not-a-number"}
    good_event = _events("IT-good")[0]
    result = sink.ship([(event.uuid, bad), (good_event.uuid, to_document(good_event, SOURCE))])
    assert result.shipped == (good_event.uuid,)
    assert set(result.failed) == {event.uuid}
    assert "400" in result.failed[event.uuid]
    assert not result.retryable


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_port_raises_unavailable() -> None:
    sink = ElasticsearchAuditSink(f"http://127.0.0.1:{_dead_port()}", "it-dead", request_timeout=2)
    event = _events("IT-dead")[0]
    with pytest.raises(AuditSinkUnavailable) as info:
        sink.ship([(event.uuid, to_document(event, SOURCE))])
    assert info.value.__cause__ is not None
    with pytest.raises(AuditSinkUnavailable):
        sink.ensure_ready()
    sink.close()


def test_stored_text_is_indexed_as_is_and_a_redelivery_changes_nothing(sink: ElasticsearchAuditSink) -> None:
    """The outbox's stored JSON text (hash chain included) is what the repository keeps, unchanged."""
    import json

    from compliance.audit.chain import GENESIS, extend_serialized, verify_chain

    sink.ensure_ready()
    events = _events(f"IT-{uuid.uuid4().hex[:8]}")
    documents = [to_document(e, SOURCE) for e in events]
    _, _, texts = extend_serialized(0, GENESIS, documents)
    batch = [(e.uuid, t) for e, t in zip(events, texts, strict=True)]

    first = sink.ship_serialized(batch)
    assert set(first.shipped) == {e.uuid for e in events} and not first.failed
    tampered = [(u, json.dumps({**json.loads(t), "event.outcome_description": "overwritten"})) for u, t in batch]
    second = sink.ship_serialized(tampered)
    assert set(second.shipped) == {e.uuid for e in events} and not second.failed
    sink.refresh_for_tests()

    stored = []
    for event, text in zip(events, texts, strict=True):
        got = sink.client.get(index=index_name(sink.index_prefix, event.occurred_at), id=event.uuid)
        assert got["_source"] == json.loads(text)
        stored.append(got["_source"])
    assert verify_chain(stored, start_prev=GENESIS, expected_first_seq=1, expected_last_seq=3).intact


def test_an_index_made_by_an_older_template_takes_new_fields_and_keeps_its_own(sink: ElasticsearchAuditSink) -> None:
    """Upgrading a deployment: this month's index was created before chain.prev/chain.hash lost their
    index and doc values (Elasticsearch cannot change that on a live index). The shipper must still
    get ready and ship into it; fields the index lacks are added."""
    from compliance.audit.elasticsearch import load_template

    event = _events(f"IT-{uuid.uuid4().hex[:8]}")[0]
    index = index_name(sink.index_prefix, event.occurred_at)
    properties = load_template(sink.index_prefix)["template"]["mappings"]["properties"]
    older = {name: spec for name, spec in properties.items() if name != "recipient"}  # a field added since
    older["chain"] = {"properties": {"seq": {"type": "long"}, "prev": {"type": "keyword"}, "hash": {"type": "keyword"}}}
    sink.client.indices.create(index=index, mappings={"dynamic": "strict", "properties": older})
    # another deployment whose prefix starts with this one's: the same pattern matches it, it is not ours
    other = f"{sink.index_prefix}-staging-2026.11"
    sink.client.indices.create(index=other, mappings={"properties": {"note": {"type": "keyword"}}})

    sink.ensure_ready()
    sink.ensure_ready()  # idempotent on the upgraded index too
    mapping = sink.client.indices.get_mapping(index=index)[index]["mappings"]["properties"]
    assert mapping["chain"]["properties"]["hash"] == {"type": "keyword"}  # as the index was made
    assert mapping["recipient"] == properties["recipient"]  # added
    assert sink.client.indices.get_mapping(index=other)[other]["mappings"]["properties"] == {
        "note": {"type": "keyword"}}
    result = sink.ship([(event.uuid, to_document(event, SOURCE))])
    assert result.shipped == (event.uuid,) and not result.failed


def test_a_deployment_whose_prefix_extends_this_ones_shares_the_cluster_unseen(
        sink: ElasticsearchAuditSink) -> None:
    """On a shared cluster another deployment's prefix may extend this one's ("{prefix}-staging"): it
    can install its template, and its events about the same patient are neither found by this
    deployment's searches nor taken for insertions into this trail by ``verify``, and vice versa."""
    from compliance.audit.queries import AuditQueryService, AuditSearch
    from compliance.audit.verify import iter_repository

    staging = ElasticsearchAuditSink(URL, f"{sink.index_prefix}-staging", request_timeout=30)
    try:
        sink.ensure_ready()
        staging.ensure_ready()  # Elasticsearch refuses overlapping templates of the same priority
        patient = f"IT-{uuid.uuid4().hex[:8]}"
        ours, theirs = _events(patient), _events(patient)
        for target, events in ((sink, ours), (staging, theirs)):
            shipped = target.ship([(e.uuid, to_document(e, SOURCE)) for e in events]).shipped
            assert set(shipped) == {e.uuid for e in events}
            target.refresh_for_tests()
        for target, events in ((sink, ours), (staging, theirs)):
            page = AuditQueryService(target.client, target.index_prefix).search(
                AuditSearch(patients=(patient,)), size=100)
            naming = [e.uuid for e in events[:2]]  # the third, a security alert, names no patient
            assert sorted(d["event.uuid"] for d in page.events) == sorted(naming) and page.total == 2
            # the other's documents carry no chain fields here: they would be reported as insertions
            assert sorted(d["_id"] for d in iter_repository(target.client, target.index_prefix)) == \
                sorted(e.uuid for e in events)
    finally:
        _delete_template(staging)
        staging.close()
