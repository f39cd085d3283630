"""No audit event is lost under attack on the pipeline: Elasticsearch down during traffic, the
gateway killed with SIGKILL mid-shipping. Moved here from the integration suite (issue 12): these are
the outages an attacker who can stop a service would cause, kept so that they never regress."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections import Counter

import httpx
import pytest
from sqlalchemy import create_engine, text

from compliance.config import PROJECT_ROOT
from tests.integration.conftest import Stack, _reset_database, drop_prefix, start_gateway, stop_gateway

pytestmark = pytest.mark.integration

STACK_SCRIPT = PROJECT_ROOT / "deploy" / "local"


def es_count(stack: Stack, prefix: str, **terms: str) -> tuple[int, int]:
    """(documents, distinct event uuids) under the prefix, both exact.

    The uuids are read back one by one: Elasticsearch's cardinality aggregation is an estimate, and
    once counted 603 distinct uuids among 604 documents that all had their own."""
    httpx.post(f"{stack.es_url}/{prefix}-*/_refresh", params={"ignore_unavailable": "true",
               "allow_no_indices": "true"}, timeout=30)
    query = {"bool": {"filter": [{"term": {k: v}} for k, v in terms.items()]}}
    r = httpx.post(f"{stack.es_url}/{prefix}-*/_search", timeout=30,
                   params={"ignore_unavailable": "true", "allow_no_indices": "true"},
                   json={"size": 10_000, "query": query, "track_total_hits": True, "_source": ["event.uuid"]})
    if r.status_code == 503:
        # a monthly index the shipper has just created whose shard is not started yet: nothing to count
        # yet (a final count never passes on this, it can only come out short)
        return 0, 0
    r.raise_for_status()
    body = r.json()
    total = body["hits"]["total"]["value"]
    uuids = [h["_source"]["event.uuid"] for h in body["hits"]["hits"]]
    assert len(uuids) == total, "more documents than one page holds: count them another way"
    duplicated = sorted(u for u, n in Counter(uuids).items() if n > 1)
    if duplicated:  # name them: a duplicate is what these tests exist to catch
        print(f"duplicated event uuids under {prefix}: {duplicated[:10]}")
    return total, len(set(uuids))


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


class TcpGate:
    """A TCP forwarder between the gateway and the real Elasticsearch that the test can shut.

    Shut, its port refuses connections and every open connection is cut: to the gateway this is
    exactly an Elasticsearch that was stopped (connection refused, then reset), without stopping the
    cluster other test runs on this machine share.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        import socket
        import threading

        self._socket, self._threading = socket, threading
        self.upstream = (upstream_host, upstream_port)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        sock = self._socket.socket()
        sock.setsockopt(self._socket.SOL_SOCKET, self._socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self._listener = sock
        self._threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def shut(self) -> None:
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            for c in self._conns:
                try:
                    c.shutdown(self._socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns.clear()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = self._socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                self._threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass


def test_nothing_is_lost_while_elasticsearch_is_down(stack: Stack, tmp_path):
    """500 audited requests while Elasticsearch is unreachable; all 500 arrive exactly once afterwards.

    By default the outage is made with a :class:`TcpGate` in front of the real cluster, so parallel
    test runs sharing the machine's Elasticsearch are not disturbed. With
    ``COMPLIANCE_TEST_STOP_ELASTICSEARCH=1`` (a machine running one suite, e.g. CI) the cluster itself
    is stopped with ``deploy/local/down elasticsearch`` and started again.
    """
    from urllib.parse import urlsplit

    prefix = f"test-durable-{uuid.uuid4().hex[:10]}"
    db = f"sqlite:///{tmp_path / 'durable.db'}"
    _reset_database(db)
    stop_cluster = os.environ.get("COMPLIANCE_TEST_STOP_ELASTICSEARCH") == "1"
    es = urlsplit(stack.es_url)
    gate = TcpGate(es.hostname or "127.0.0.1", es.port or 9200)
    gate.open()
    extra = {} if stop_cluster else {"COMPLIANCE_ELASTICSEARCH_URL": f"http://127.0.0.1:{gate.port}"}
    gw = start_gateway(stack, tmp_path, database_url=db, index_prefix=prefix, extra_env=extra)
    token = stack.token("alice")
    try:
        if stop_cluster:
            subprocess.run(["bash", str(STACK_SCRIPT / "down"), "elasticsearch"], check=True, capture_output=True)
        else:
            gate.shut()
        try:
            queries(gw, token, 500, "ES-DOWN")  # every request is still answered: the outbox holds the events
            total, backlog = outbox_total(db)
            assert backlog >= 500
            metrics = httpx.get(f"{gw.url}/metrics", timeout=30,  # an admin's token: system:status:read
                                headers={"Authorization": f"Bearer {stack.token('ada')}"}).text
            assert "compliance_audit_shipper_up 0" in metrics
        finally:
            if stop_cluster:
                subprocess.run(["bash", str(STACK_SCRIPT / "up"), "elasticsearch"], check=True, capture_output=True)
            else:
                gate.open()
        arrived = wait_until(lambda: es_count(stack, prefix, **{"event.id": "110112"})[0] >= 500, within=120)
        assert arrived
        time.sleep(1)
        docs, distinct = es_count(stack, prefix, **{"event.id": "110112", "user.name": "alice"})
        assert (docs, distinct) == (500, 500)
        assert wait_until(lambda: outbox_total(db)[1] == 0, within=60)
    finally:
        stop_gateway(gw)
        gate.shut()
        drop_prefix(stack, prefix)


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
        # and the chain in the repository is whole: no gap, no repeat, every link intact
        import sys

        out = subprocess.run([sys.executable, "-m", "compliance.cli", "audit", "verify"], cwd=PROJECT_ROOT,
                             env={**gw.env, "COMPLIANCE_DATABASE_URL": db, "COMPLIANCE_AUDIT_INDEX_PREFIX": prefix},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.startswith("intact:"), out.stdout + out.stderr
    finally:
        stop_gateway(gw)
        drop_prefix(stack, prefix)
