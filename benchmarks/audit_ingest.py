"""Audit ingest: events per second from one gateway process into Elasticsearch through the outbox.

Measured (one process, as the gateway runs it): ``--events`` pre-rendered audit documents (110112
Query events for a handful of users and patients, ATNA XML included, as the request path renders
them) are recorded by ``--concurrency`` concurrent asyncio tasks through :meth:`SqlAuditOutbox.record`
(what ``AuditRecorder.record`` does in a request: group commit, hash chain, durable commit; SQLite
with synchronous=FULL, or ``--database postgres``), while the :class:`AuditShipper` (with the
checkpoint signer) bulk-indexes them into Elasticsearch. The clock runs from the first record until
every event is marked shipped; then the count in Elasticsearch is checked and the hash chain in
Elasticsearch is verified against the outbox and the signed checkpoints (``compliance audit verify``).

Baseline, same run, same documents, straight into a fresh index prefix with the same template and
``op_type=create``, one bulk request of 1000 documents in flight (as the shipper): the faster of
``elasticsearch.helpers.bulk`` with the client's default serializer and with its orjson serializer.
For information, ``helpers.parallel_bulk`` with two requests in flight is measured too (not the
baseline: the shipper keeps one request in flight). Each round measures the baselines and then the
outbox path; with ``--rounds`` > 1 the medians are reported. Targets: >= 5,000 events/s and >= 0.8x
the baseline.

    .venv/bin/python benchmarks/audit_ingest.py [--events 30000] [--concurrency 64] [--rounds 3]
                                                [--database sqlite|postgres]

Needs the local stack's Elasticsearch (deploy/local/up); ``--database postgres`` uses the stack's
PostgreSQL (COMPLIANCE_POSTGRES_URL) in a schema of its own, dropped afterwards. Uses and then deletes
its own indices. The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
from elasticsearch import Elasticsearch  # noqa: E402
from elasticsearch.helpers import bulk, parallel_bulk  # noqa: E402
from elasticsearch.serializer import OrjsonSerializer  # noqa: E402

from compliance.audit.atna import AuditSource  # noqa: E402
from compliance.audit.checkpoints import (  # noqa: E402
    AuditCheckpointer,
    CheckpointSigner,
    ElasticsearchCheckpoints,
    SqlCheckpointStore,
    generate_key_file,
)
from compliance.audit.codes import Outcome  # noqa: E402
from compliance.audit.documents import index_name, to_document  # noqa: E402
from compliance.audit.elasticsearch import ElasticsearchAuditSink  # noqa: E402
from compliance.audit.events import query_event  # noqa: E402
from compliance.audit.message import PatientRef, UserRef  # noqa: E402
from compliance.audit.outbox import OutboxEntry, SqlAuditOutbox  # noqa: E402
from compliance.audit.shipper import AuditShipper  # noqa: E402
from compliance.audit.verify import verify_repository  # noqa: E402
from compliance.config import load_settings  # noqa: E402
from compliance.db.migrate import scratch_schema, upgrade  # noqa: E402
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


def _bulk_one_in_flight(client: Elasticsearch, actions: Iterator[dict]) -> None:
    _, errors = bulk(client, actions, chunk_size=1000, raise_on_error=False, max_retries=0)
    assert not errors, errors[:1]


def _bulk_two_in_flight(client: Elasticsearch, actions: Iterator[dict]) -> None:
    for ok, item in parallel_bulk(client, actions, chunk_size=1000, thread_count=2, queue_size=2,
                                  raise_on_error=False):
        assert ok, item


DIRECT: dict[str, tuple[bool, Callable[[Elasticsearch, Iterator[dict]], None]]] = {
    # name: (orjson serializer, loader)
    "bulk": (False, _bulk_one_in_flight),
    "bulk_orjson": (True, _bulk_one_in_flight),
    "parallel_bulk_2": (True, _bulk_two_in_flight),
}


def direct_bulk(url: str, entries: list[OutboxEntry], variant: str = "bulk") -> tuple[float, int]:
    prefix = f"bench-direct-{uuid.uuid4().hex[:8]}"
    sink = ElasticsearchAuditSink(url, prefix, request_timeout=120)
    sink.ensure_ready()
    use_orjson, load = DIRECT[variant]
    client = Elasticsearch(url, request_timeout=120, serializer=OrjsonSerializer()) if use_orjson else sink.client
    try:
        t0 = time.perf_counter()
        actions = ({"_op_type": "create", "_index": index_name(prefix, e.occurred_at), "_id": e.uuid,
                    "_source": e.document} for e in entries)
        load(client, actions)
        elapsed = time.perf_counter() - t0
        return elapsed, es_count(url, prefix)
    finally:
        if client is not sink.client:
            client.close()
        sink.close()
        drop(url, prefix)


@contextmanager
def database(kind: str, tmp: Path) -> Iterator[str]:
    """A fresh, migrated database URL: a SQLite file, or a PostgreSQL schema of its own."""
    if kind == "sqlite":
        url = f"sqlite:///{tmp / 'bench.db'}"
        upgrade(url)
        yield url
        return
    base = os.environ.get("COMPLIANCE_POSTGRES_URL") or _stack_value("COMPLIANCE_POSTGRES_URL")
    if not base:
        raise SystemExit("--database postgres needs COMPLIANCE_POSTGRES_URL (the local stack writes it)")
    with scratch_schema(base, "bench") as url:
        yield url


def _stack_value(name: str) -> str | None:
    env = Path(__file__).resolve().parent.parent / ".stack" / "gateway.env"
    if env.is_file():
        for line in env.read_text().splitlines():
            if line.startswith(f"{name}="):
                return line.split("=", 1)[1].strip()
    return None


def through_outbox(url: str, entries: list[OutboxEntry], concurrency: int, tmp: Path,
                   db_kind: str = "sqlite") -> dict:
    prefix = f"bench-outbox-{uuid.uuid4().hex[:8]}"
    with database(db_kind, tmp) as db:
        engine = make_engine(db)
        outbox = SqlAuditOutbox(engine)
        key = tmp / "checkpoint.pem"
        if not key.exists():
            generate_key_file(key)
        signer = CheckpointSigner.from_file(key)
        sink = ElasticsearchAuditSink(url, prefix, request_timeout=120)
        sink.ensure_ready()
        checkpointer = AuditCheckpointer(SqlCheckpointStore(engine), signer,
                                         publish=ElasticsearchCheckpoints(sink.client, prefix).publish,
                                         every_events=1000, every_seconds=60)
        shipper = AuditShipper(outbox, sink, batch_size=1000, interval_seconds=0.05, max_backoff_seconds=2,
                               checkpointer=checkpointer)

        async def produce() -> None:
            queue = iter(entries)

            async def worker() -> None:
                for entry in queue:
                    await outbox.record(entry)  # what AuditRecorder.record does in a request

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
            in_es = es_count(url, prefix)
            verdict = verify_repository(sink.client, prefix, outbox, public_key=signer.public_key, engine=engine)
            return {"seconds": elapsed, "recorded_seconds": recorded, "in_es": in_es,
                    "checkpoints": SqlCheckpointStore(engine).count(), "chain_head": outbox.chain_head()[0],
                    "verify": verdict.summary(), "intact": verdict.intact}
        finally:
            outbox.close()
            sink.close()
            engine.dispose()
            drop(url, prefix)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=30000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="baselines + outbox path, this many times (medians)")
    ap.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    args = ap.parse_args()
    url = load_settings().elasticsearch_url
    print(f"rendering {args.events} audit documents ...", flush=True)
    entries = documents(args.events)
    size = sum(len(json.dumps(e.document)) for e in entries[:1000]) / 1000
    print(f"average document {size:.0f} bytes; database {args.database}", flush=True)
    # Warm-up (JIT-free Python, but Elasticsearch's caches and index creation paths are not).
    direct_bulk(url, entries[:2000])
    rounds: list[dict] = []
    for r in range(1, args.rounds + 1):
        direct: dict[str, float] = {}
        counts: dict[str, int] = {}
        for variant in DIRECT:
            seconds, counts[variant] = direct_bulk(url, entries, variant)
            direct[variant] = args.events / seconds
        baseline = max(direct["bulk"], direct["bulk_orjson"])
        with tempfile.TemporaryDirectory() as tmp:
            res = through_outbox(url, entries, args.concurrency, Path(tmp), args.database)
        rate = args.events / res["seconds"]
        ok = res["in_es"] == args.events and all(c == args.events for c in counts.values()) and res["intact"]
        rounds.append({"direct": direct, "baseline": baseline, "outbox": rate, "ratio": rate / baseline,
                       "recorded_s": res["recorded_seconds"], "checkpoints": res["checkpoints"], "ok": ok})
        print(f"round {r}: direct bulk {direct['bulk']:6.0f} ev/s, bulk+orjson {direct['bulk_orjson']:6.0f}, "
              f"(parallel_bulk x2 {direct['parallel_bulk_2']:6.0f}); through outbox {rate:6.0f} ev/s "
              f"({res['seconds']:.2f} s, all recorded durably after {res['recorded_seconds']:.2f} s; "
              f"{res['in_es']} in ES; {res['checkpoints']} checkpoints); ratio {rate / baseline:.2f}x; "
              f"{res['verify']}", flush=True)
    med = statistics.median
    rate, baseline = med(r["outbox"] for r in rounds), med(r["baseline"] for r in rounds)
    ratio = med(r["ratio"] for r in rounds)
    print(f"median of {len(rounds)}: baseline {baseline:.0f} ev/s, through outbox {rate:.0f} ev/s, "
          f"ratio {ratio:.2f}x (target >= 0.8x: {'met' if ratio >= 0.8 else 'NOT met'}); "
          f"target >= 5000 events/s: {'met' if rate >= 5000 else 'NOT met'}")
    print(json.dumps({"benchmark": "audit_ingest", "events": args.events, "concurrency": args.concurrency,
                      "database": args.database, "doc_bytes": round(size), "rounds": len(rounds),
                      "direct_events_per_s": round(baseline), "outbox_events_per_s": round(rate),
                      "ratio": round(ratio, 3),
                      "per_round": [{"direct_bulk": round(r["direct"]["bulk"]),
                                     "direct_bulk_orjson": round(r["direct"]["bulk_orjson"]),
                                     "direct_parallel_bulk_2": round(r["direct"]["parallel_bulk_2"]),
                                     "outbox": round(r["outbox"]), "ratio": round(r["ratio"], 3),
                                     "outbox_recorded_s": round(r["recorded_s"], 2)} for r in rounds],
                      "all_delivered_and_chain_intact": all(r["ok"] for r in rounds),
                      "checkpoints": rounds[-1]["checkpoints"], "cpus": os.cpu_count(),
                      "python": platform.python_version()}))


if __name__ == "__main__":
    main()
