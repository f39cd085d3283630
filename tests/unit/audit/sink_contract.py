"""The AuditSink contract (compliance/audit/interfaces.py), one suite for every implementation.

A test module runs it by subclassing :class:`AuditSinkContract` as ``Test...`` and providing a
``harness`` fixture (a :class:`SinkHarness` per implementation): tests/unit/audit/test_audit_sink_contract.py
for the sinks that need no server, tests/integration/test_audit_sink_contract.py for Elasticsearch.

What a sink promises:

* ``ship`` stores every document of a batch and reports its uuid in ``shipped``; an empty batch ships
  nothing;
* delivery is idempotent by event uuid: a second delivery of a uuid is reported shipped again and
  never overwrites what the repository holds for it (and is a no-op where the sink itself can tell,
  ``SinkHarness.deduplicates``; a syslog receiver tells a repeat by the uuid in the message);
* a document the sink cannot store (no ``@timestamp``) is reported in ``failed`` with a reason,
  and the rest of its batch is still shipped;
* an unreachable backend raises :class:`AuditSinkUnavailable` from ``ship`` (the batch stays in the
  outbox), and from ``ensure_ready`` where the sink checks its backend there;
* a sink that takes the outbox's stored JSON text (``ship_serialized``) stores what ``ship`` stores.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from compliance.audit.atna import AuditSource
from compliance.audit.codes import Outcome
from compliance.audit.documents import to_document
from compliance.audit.events import query_event
from compliance.audit.interfaces import AuditSink, AuditSinkUnavailable
from compliance.audit.message import PatientRef, UserRef

SOURCE = AuditSource("contract-gateway", "contract-site")
USER = UserRef("contract-sub", "contract-user", "contract-client", ("radiologist",), "10.1.2.3")
#: One month for every document of a test, so a uuid's deliveries meet in one monthly index.
WHEN = datetime(2026, 11, 28, 9, 30, tzinfo=UTC)


@dataclass
class SinkHarness:
    """One AuditSink implementation under the contract, and how the suite looks at its backend."""

    sink: AuditSink
    #: What the repository holds for a uuid, in arrival order.
    stored: Callable[[str], list[Any]]
    #: What the repository holds for a document shipped to it (the form ``stored`` returns).
    as_stored: Callable[[dict[str, Any]], Any]
    #: A sink of the same kind whose backend cannot be reached.
    unreachable: Callable[[], AuditSink]
    #: Waits until what was shipped can be read back (a refresh, a receiver catching up).
    settle: Callable[[], None] = lambda: None
    #: The sink itself makes a repeated uuid a no-op (else the repository tells repeats apart).
    deduplicates: bool = True
    #: ``ensure_ready`` reaches the backend (a fan-out checks each sink inside ``ship`` instead).
    checks_backend_when_readied: bool = True


def document(*, query: bytes = b"PatientID=P-1", outcome: Outcome = Outcome.SUCCESS) -> tuple[str, dict[str, Any]]:
    """A real audit document (as the outbox ships it), with a fresh uuid."""
    event = query_event(user=USER, gateway_id="contract-gateway", outcome=outcome, query=query,
                        sop_class_uid=None, patients=[PatientRef("P-1", "Doe^Jane")], occurred_at=WHEN)
    return event.uuid, to_document(event, SOURCE)


class AuditSinkContract:
    """The assertions every AuditSink implementation passes (run through a ``harness`` fixture)."""

    def test_is_an_audit_sink(self, harness: SinkHarness) -> None:
        assert isinstance(harness.sink, AuditSink)

    def test_an_empty_batch_ships_nothing(self, harness: SinkHarness) -> None:
        harness.sink.ensure_ready()
        result = harness.sink.ship([])
        assert (result.shipped, dict(result.failed)) == ((), {})

    def test_every_document_of_a_batch_is_stored_and_reported_shipped(self, harness: SinkHarness) -> None:
        batch = [document(query=f"PatientID=P-{n}".encode()) for n in range(3)]
        harness.sink.ensure_ready()
        result = harness.sink.ship(batch)
        assert sorted(result.shipped) == sorted(u for u, _ in batch)
        assert dict(result.failed) == {}
        harness.settle()
        assert [harness.stored(u) for u, _ in batch] == [[harness.as_stored(doc)] for _, doc in batch]

    def test_a_second_delivery_of_a_uuid_is_shipped_and_never_overwrites_the_first(
            self, harness: SinkHarness) -> None:
        event_uuid, first = document()
        _, other = document(query=b"PatientID=changed", outcome=Outcome.MAJOR_FAILURE)
        second = {**other, "event.uuid": event_uuid}
        harness.sink.ensure_ready()
        assert harness.sink.ship([(event_uuid, first)]).shipped == (event_uuid,)
        again = harness.sink.ship([(event_uuid, second)])
        assert (again.shipped, dict(again.failed)) == ((event_uuid,), {})
        harness.settle()
        held = harness.stored(event_uuid)
        assert held[0] == harness.as_stored(first)
        if harness.deduplicates:
            assert held == [harness.as_stored(first)]

    def test_a_document_it_cannot_store_fails_alone(self, harness: SinkHarness) -> None:
        good_uuid, good = document()
        bad_uuid, complete = document()
        bad = {k: v for k, v in complete.items() if k != "@timestamp"}
        harness.sink.ensure_ready()
        result = harness.sink.ship([(bad_uuid, bad), (good_uuid, good)])
        assert result.shipped == (good_uuid,)
        assert list(result.failed) == [bad_uuid]
        assert result.failed[bad_uuid]  # a reason, for the outbox's last_error
        harness.settle()
        assert (harness.stored(good_uuid), harness.stored(bad_uuid)) == ([harness.as_stored(good)], [])

    def test_an_unreachable_backend_raises_sink_unavailable(self, harness: SinkHarness) -> None:
        down = harness.unreachable()
        if harness.checks_backend_when_readied:
            with pytest.raises(AuditSinkUnavailable):
                down.ensure_ready()
        with pytest.raises(AuditSinkUnavailable):
            down.ship([document()])

    def test_the_stored_json_text_is_stored_as_the_document(self, harness: SinkHarness) -> None:
        ship_serialized = getattr(harness.sink, "ship_serialized", None)
        if ship_serialized is None:
            pytest.skip(f"{type(harness.sink).__name__} takes documents only")
        event_uuid, doc = document()
        harness.sink.ensure_ready()
        result = ship_serialized([(event_uuid, orjson.dumps(doc).decode())])
        assert (result.shipped, dict(result.failed)) == ((event_uuid,), {})
        harness.settle()
        assert harness.stored(event_uuid) == [harness.as_stored(doc)]


def unique_prefix(kind: str) -> str:
    """An index prefix (or name) of this test's own."""
    return f"contract-{kind}-{uuid.uuid4().hex[:12]}"
