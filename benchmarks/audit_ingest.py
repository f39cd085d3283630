"""Audit ingest: events per second from one gateway process into Elasticsearch through the outbox.

Measured (one process, as the gateway runs it): ``--events`` pre-rendered audit documents (110112
Query events for a handful of users and patients, ATNA XML included, as the request path renders
them) are submitted by ``--concurrency`` concurrent asyncio tasks to :class:`SqlAuditOutbox` (group
commit, hash chain, durable SQLite commit with synchronous=FULL), while the :class:`AuditShipper`
(with the checkpoint signer) bulk-indexes them into Elasticsearch. The clock runs from the first
submit until every event is marked shipped; the count in Elasticsearch is then checked.

Baseline, same run, same documents: ``elasticsearch.helpers.bulk`` straight into a fresh index
prefix (chunks of 1000, ``op_type=create``, the same template), i.e. what Elasticsearch itself can
take from one Python client. Targets: >= 5,000 events/s and >= 0.8x the baseline.

    .venv/bin/python benchmarks/audit_ingest.py [--events 30000] [--concurrency 64]

Needs the local stack's Elasticsearch (deploy/local/up). Uses and then deletes its own indices.
The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
from elasticsearch.helpers import bulk  # noqa: E402

from compliance.audit.atna import AuditSource  # noqa: E402
from compliance.audit.checkpoints import (  # noqa: E402
    AuditCheckpointer,
    CheckpointSigner,
    ElasticsearchCheckpoints,
    SqlCheckpointStore,
    generate_key_file,
)
from compliance.audit.documents import index_name, to_document  # noqa: E402
from compliance.audit.elasticsearch import ElasticsearchAuditSink  # noqa: E402
from compliance.audit.events import Outcome, PatientRef, UserRef, query_event  # noqa: E402
from compliance.audit.outbox import AuditShipper, OutboxEntry, SqlAuditOutbox  # noqa: E402
from compliance.config import load_settings  # noqa: E402
from compliance.db.migrate import upgrade  # noqa: E402
from compliance.db.session import make_engine  # noqa: E402


def documents(n: int) -> list[OutboxEntry]:
    source = AuditSource(source_id="compliance-gateway", enterprise_site_id="bench-hospital")
    users = [UserRef(user_id=f"sub-{i}", username=f"user{i}", client_id="ohif", roles=("clinician",),
                     source_address=f"10.0.0.{i}") for i in range(8)]
    start = datetime.now(UTC) - timedelta(seconds=n)
    out = []
    for i in range(n):
        event = query_event(user=users[i % 8], gateway_id="compliance-gateway", outcome=Outcome.SUCCESS,
                            query=f"PatientID=P{i % 500}&includefield=all".encode(), sop_class_uid=None,
                            patients=[PatientRef(f"P{i % 500}", f"DOE^JANE{i % 500}")], resource="/dicom-web/studies",
                            occurred_at=start + timedelta(seconds=i))
        out.append(OutboxEntry(uuid=event.uuid, event_code="110112", occurred_at=event.occurred_at,
                               document=to_document(event, source)))
    return out


def es_count(url: str, prefix: str) -> int:
    httpx.post(f"{url}/{prefix}-*/_refresh", timeout=60)
    return int(httpx.get(f"{url}/{prefix}-*/_count", timeout=60).json()["count"])


def drop(url: str, prefix: str) -> None:
    found = httpx.get(f"{url}/{prefix}-*,{prefix}.checkpoints", timeout=60,
                      params={"ignore_unavailable": "true", "allow_no_indices": "true"})
    for index in found.json() if found.status_code == 200 else []:
        httpx.delete(f"{url}/{index}", timeout=60)
    httpx.delete(f"{url}/_index_template/{prefix}-events", timeout=60)


def direct_bulk(url: str, entries: list[OutboxEntry]) -> tuple[float, int]:
    prefix = f"bench-direct-{uuid.uuid4().hex[:8]}"
    sink = ElasticsearchAuditSink(url, prefix, request_timeout=120)
    sink.ensure_ready()
    try:
        t0 = time.perf_counter()
        actions = ({"_op_type": "create", "_index": index_name(prefix, e.occurred_at), "_id": e.uuid,
                    "_source": e.document} for e in entries)
        ok, errors = bulk(sink.client, actions, chunk_size=1000, raise_on_error=False, max_retries=0)
        elapsed = time.perf_counter() - t0
        assert not errors, errors[:1]
        return elapsed, es_count(url, prefix)
    finally:
        sink.close()
        drop(url, prefix)


def through_outbox(url: str, entries: list[OutboxEntry], concurrency: int, tmp: Path) -> dict:
    prefix = f"bench-outbox-{uuid.uuid4().hex[:8]}"
    db = f"sqlite:///{tmp / 'bench.db'}"
    upgrade(db)
    engine = make_engine(db)
    outbox = SqlAuditOutbox(engine)
    key = tmp / "checkpoint.pem"
    generate_key_file(key)
    sink = ElasticsearchAuditSink(url, prefix, request_timeout=120)
    sink.ensure_ready()
    checkpointer = AuditCheckpointer(SqlCheckpointStore(engine), CheckpointSigner.from_file(key),
                                     publish=ElasticsearchCheckpoints(sink.client, prefix).publish,
                                     every_events=1000, every_seconds=60)
    shipper = AuditShipper(outbox, sink, batch_size=1000, interval_seconds=0.05, max_backoff_seconds=2,
                           checkpointer=checkpointer)

    async def produce() -> None:
        queue = iter(entries)

        async def worker() -> None:
            for entry in queue:
                await asyncio.wrap_future(outbox.submit(entry))

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    try:
        t0 = time.perf_counter()
        shipper.start()
        asyncio.run(produce())
        recorded = time.perf_counter() - t0
        while outbox.backlog():
            shipper.wake()
            time.sleep(0.01)
        elapsed = time.perf_counter() - t0
        shipper.stop(drain_seconds=1)
        checkpointer.tick(force=True)
        return {"seconds": elapsed, "recorded_seconds": recorded, "in_es": es_count(url, prefix),
                "checkpoints": SqlCheckpointStore(engine).count(), "chain_head": outbox.chain_head()[0]}
    finally:
        outbox.close()
        sink.close()
        engine.dispose()
        drop(url, prefix)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=30000)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    url = load_settings().elasticsearch_url
    print(f"rendering {args.events} audit documents ...", flush=True)
    entries = documents(args.events)
    size = sum(len(json.dumps(e.document)) for e in entries[:1000]) / 1000
    print(f"average document {size:.0f} bytes", flush=True)
    # Warm-up (JIT-free Python, but Elasticsearch's caches and index creation paths are not).
    direct_bulk(url, entries[:2000])
    direct_seconds, direct_count = direct_bulk(url, entries)
    direct_rate = args.events / direct_seconds
    print(f"direct bulk:     {direct_rate:8.0f} events/s ({direct_seconds:.2f} s, {direct_count} in ES)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        res = through_outbox(url, entries, args.concurrency, Path(tmp))
    rate = args.events / res["seconds"]
    print(f"through outbox:  {rate:8.0f} events/s ({res['seconds']:.2f} s; all recorded durably after "
          f"{res['recorded_seconds']:.2f} s; {res['in_es']} in ES; {res['checkpoints']} checkpoints)", flush=True)
    ratio = rate / direct_rate
    print(f"ratio {ratio:.2f}x (target >= 0.8x); target >= 5000 events/s: {'met' if rate >= 5000 else 'NOT met'}")
    ok = res["in_es"] == args.events == direct_count
    print(json.dumps({"benchmark": "audit_ingest", "events": args.events, "concurrency": args.concurrency,
                      "doc_bytes": round(size), "direct_events_per_s": round(direct_rate),
                      "outbox_events_per_s": round(rate), "ratio": round(ratio, 3),
                      "outbox_recorded_s": round(res["recorded_seconds"], 2), "all_delivered": ok,
                      "checkpoints": res["checkpoints"], "cpus": os.cpu_count(), "python": platform.python_version()}))


if __name__ == "__main__":
    main()
