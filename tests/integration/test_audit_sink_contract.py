"""The AuditSink contract (tests/unit/audit/sink_contract.py) on ElasticsearchAuditSink, against the real
Elasticsearch of the local stack, in indices of the test's own (a unique prefix, deleted afterwards)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from compliance.audit.elasticsearch import ElasticsearchAuditSink
from tests.integration.conftest import Stack, _free_port, drop_prefix
from tests.unit.audit.sink_contract import AuditSinkContract, SinkHarness, unique_prefix

pytestmark = pytest.mark.integration


@pytest.fixture()
def harness(stack: Stack) -> Iterator[SinkHarness]:
    prefix = unique_prefix("es")
    sink = ElasticsearchAuditSink(stack.es_url, prefix, request_timeout=30)

    def stored(event_uuid: str) -> list[Any]:
        found = sink.client.search(index=f"{prefix}-*", query={"ids": {"values": [event_uuid]}},
                                   allow_no_indices=True, ignore_unavailable=True)
        return [hit["_source"] for hit in found["hits"]["hits"]]

    try:
        yield SinkHarness(
            sink=sink, stored=stored, as_stored=lambda document: document,
            unreachable=lambda: ElasticsearchAuditSink(f"http://127.0.0.1:{_free_port()}", prefix,
                                                       request_timeout=5),
            settle=sink.refresh_for_tests)
    finally:
        drop_prefix(stack, prefix)
        sink.close()


class TestAuditSinkContract(AuditSinkContract):
    pass
