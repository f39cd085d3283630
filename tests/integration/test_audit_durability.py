"""No audit event is lost: Elasticsearch down during traffic, the gateway killed mid-shipping."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

import httpx
import pytest
from sqlalchemy import create_engine, text

from compliance.config import PROJECT_ROOT

from .conftest import Stack, _reset_database, start_gateway, stop_gateway

pytestmark = pytest.mark.integration

STACK_SCRIPT = PROJECT_ROOT / "deploy" / "local"


def es_count(stack: Stack, prefix: str, **terms: str) -> tuple[int, int]:
    """(documents, distinct event uuids) under the prefix."""
    httpx.post(f"{stack.es_url}/{prefix}-*/_refresh", params={"ignore_unavailable": "true",
               "allow_no_indices": "true"}, timeout=30)
    query = {"bool": {"filter": [{"term": {k: v}} for k, v in terms.items()]}}
    r = httpx.post(f"{stack.es_url}/{prefix}-*/_search", timeout=30,
                   params={"ignore_unavailable": "true", "allow_no_indices": "true"},
                   json={"size": 0, "query": query, "track_total_hits": True,
                         "aggs": {"u": {"cardinality": {"field": "event.uuid", "precision_threshold": 40000}}}})
    r.raise_for_status()
    body = r.json()
    return body["hits"]["total"]["value"], body["aggregations"]["u"]["value"]


def outbox_total(db_url: str) -> tuple[int, int]:
    engine = create_engine(db_url)
    with engine.connect() as c:
        total = c.execute(text("select count(*) from audit_outbox")).scalar_one()
        backlog = c.execute(text("select count(*) from audit_outbox where shipped_at is null")).scalar_one()
    engine.dispose()
    return int(total), int(backlog)


def wait_until(predicate, within: float, step: float = 0.5):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def queries(gw, token: str, n: int, tag: str) -> None:
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {token}"}) as client:
        for i in range(n):
            r = client.get(f"{gw.url}/dicom-web/studies", params={"PatientID": f"{tag}-{i}"})
            assert r.status_code in (200, 204), r.text


def test_nothing_is_lost_while_elasticsearch_is_down(stack: Stack, tmp_path):
    prefix = f"test-durable-{uuid.uuid4().hex[:10]}"
    db = f"sqlite:///{tmp_path / 'durable.db'}"
    _reset_database(db)
    gw = start_gateway(stack, tmp_path, database_url=db, index_prefix=prefix)
    token = stack.token("alice")
    try:
        subprocess.run(["bash", str(STACK_SCRIPT / "down"), "elasticsearch"], check=True, capture_output=True)
        try:
            queries(gw, token, 500, "ES-DOWN")  # every request is still answered: the outbox holds the events
            total, backlog = outbox_total(db)
            assert backlog >= 500
        finally:
            subprocess.run(["bash", str(STACK_SCRIPT / "up"), "elasticsearch"], check=True, capture_output=True)
        arrived = wait_until(lambda: es_count(stack, prefix, **{"event.id": "110112"})[0] >= 500, within=120)
        assert arrived
        time.sleep(1)
        docs, distinct = es_count(stack, prefix, **{"event.id": "110112", "user.name": "alice"})
        assert (docs, distinct) == (500, 500)
        assert wait_until(lambda: outbox_total(db)[1] == 0, within=60)
    finally:
        stop_gateway(gw)
        httpx.delete(f"{stack.es_url}/{prefix}-*", timeout=30)


def test_kill_9_mid_shipping_loses_and_duplicates_nothing(stack: Stack, tmp_path):
    prefix = f"test-kill9-{uuid.uuid4().hex[:10]}"
    db = f"sqlite:///{tmp_path / 'kill9.db'}"
    _reset_database(db)
    token = stack.token("alice")
    # 1. record a backlog without shipping it
    gw = start_gateway(stack, tmp_path, database_url=db, index_prefix=prefix,
                       extra_env={"COMPLIANCE_AUDIT_SHIPPER_ENABLED": "false"})
    try:
        queries(gw, token, 600, "KILL9")
    finally:
        stop_gateway(gw)
    total, backlog = outbox_total(db)
    assert backlog == total >= 600
    # 2. ship in small batches and kill -9 the gateway part-way through
    slow = {"COMPLIANCE_AUDIT_SHIP_BATCH_SIZE": "20", "COMPLIANCE_AUDIT_SHIP_INTERVAL_SECONDS": "0.05"}
    gw = start_gateway(stack, tmp_path, database_url=db, index_prefix=prefix, extra_env=slow)
    started = wait_until(lambda: es_count(stack, prefix)[0] >= 60, within=60, step=0.05)
    os.kill(gw.process.pid, signal.SIGKILL)
    gw.process.wait(timeout=10)
    assert started
    shipped_at_kill = es_count(stack, prefix)[0]
    assert 0 < shipped_at_kill < total + 2, "the kill must land mid-shipping"
    # 3. restart: the rest arrives, nothing twice
    gw = start_gateway(stack, tmp_path, database_url=db, index_prefix=prefix)
    try:
        assert wait_until(lambda: outbox_total(db)[1] == 0, within=120)
        final_total, _ = outbox_total(db)
        docs, distinct = es_count(stack, prefix)
        assert docs == distinct == final_total
    finally:
        stop_gateway(gw)
        httpx.delete(f"{stack.es_url}/{prefix}-*", timeout=30)
