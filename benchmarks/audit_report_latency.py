"""Patient access report latency over one million audit events (issue 5; target: p95 < 300 ms).

What it does, against the local stack's Elasticsearch (``deploy/local/up elasticsearch``):

1. installs the audit index template under a dedicated prefix ``bench-report-<random>``;
2. bulk-loads ``--events`` synthetic events, one year (2025) of activity, each built by the real
   builders of ``compliance.audit.events`` and projected by the real ``to_document`` — without the
   ``atna.xml`` body (stored, never indexed, and irrelevant to search; leaving it out keeps the
   single-node cluster's disk and 1 GiB heap comfortable). Mix: 50 % WADO retrieve (110104), 30 %
   QIDO query naming 1-3 patients (110112), 15 % metadata access (110103), 4 % denials (110113),
   1 % exports (110106); 500 users; patients: 90 % of events over ``--patients`` ordinary
   patients (~18 events each), 10 % over 100 frequent patients (~1,000 events each);
3. runs the patient access report (``ReportService.run("patient-access", patient=...)``, default
   six-year period, every page, rows built and rendered as JSON) for random patients of both groups,
   and, as the baseline measured in the same run, the bare Elasticsearch search for the same patient
   (one ``term`` query on ``patient.ids``, size 10,000, no sort, no rows);
4. prints p50/p95/max per group and the ratio report/baseline, then deletes the indices and the
   template (``--keep`` keeps them for a re-run with ``--reuse PREFIX``).

Load is bounded for a shared 2-core machine: one producer, one bulk request in flight, refresh off
while loading. Run: ``.venv/bin/python benchmarks/audit_report_latency.py [--events 1000000]``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from elastic_transport import ConnectionError as TransportConnectionError  # noqa: E402
from elasticsearch import Elasticsearch  # noqa: E402
from elasticsearch.helpers import bulk  # noqa: E402

from compliance.audit.atna import AuditSource  # noqa: E402
from compliance.audit.codes import Action, EventTypeCode, Outcome
from compliance.audit.documents import index_name, to_document  # noqa: E402
from compliance.audit.elasticsearch import ElasticsearchAuditSink  # noqa: E402
from compliance.audit.events import (
    export_event,
    instances_accessed_event,
    instances_transferred_event,
    query_event,
    security_alert_event,
)
from compliance.audit.message import PatientRef, StudyRef, UserRef
from compliance.audit.queries import AuditQueryService  # noqa: E402
from compliance.audit.reports import ReportService, render  # noqa: E402
from compliance.config import load_settings  # noqa: E402

SOURCE = AuditSource(source_id="compliance-gateway", enterprise_site_id="bench-hospital")
YEAR_START = datetime(2025, 1, 1, tzinfo=UTC)
YEAR_SECONDS = 365 * 24 * 3600
CT = "1.2.840.10008.5.1.4.1.1.2"


def patient_id(group: str, n: int) -> str:
    return f"{group}-{n:06d}"


def synthetic(n_events: int, n_patients: int, seed: int) -> Iterator[dict]:
    rnd = random.Random(seed)
    users = [UserRef(f"sub-{i:04d}", f"user{i:04d}", rnd.choice(["ohif-viewer", "ai-service", "compliance-cli"]),
                     (rnd.choice(["clinician", "radiologist", "technologist"]),),
                     f"10.{i // 250}.{i % 250}.{rnd.randint(1, 250)}")
             for i in range(500)]

    def patient() -> PatientRef:
        if rnd.random() < 0.1:
            return PatientRef(patient_id("F", rnd.randrange(100)), "Frequent^Patient")
        return PatientRef(patient_id("P", rnd.randrange(n_patients)), "Ordinary^Patient")

    for _ in range(n_events):
        user = rnd.choice(users)
        p = patient()
        study = StudyRef(f"1.2.826.0.1.3680043.10.600.{p.patient_id[2:]}.{rnd.randrange(3)}",
                         {CT: rnd.randint(1, 200)})
        when = YEAR_START + timedelta(seconds=rnd.randrange(YEAR_SECONDS))
        r = rnd.random()
        if r < 0.5:
            event = instances_transferred_event(user=user, gateway_id="compliance-gateway", source_id="orthanc",
                                                outcome=Outcome.SUCCESS, patients=[p], studies=[study],
                                                occurred_at=when)
        elif r < 0.8:
            extra = [patient() for _ in range(rnd.randrange(3))]
            patients = list({q.patient_id: q for q in [p, *extra]}.values())
            event = query_event(user=user, gateway_id="compliance-gateway", outcome=Outcome.SUCCESS,
                                query=b"GET /studies?PatientID=x", sop_class_uid=None, patients=patients,
                                studies=[study], occurred_at=when)
        elif r < 0.95:
            event = instances_accessed_event(user=user, gateway_id="compliance-gateway", action=Action.READ,
                                             outcome=Outcome.SUCCESS, patients=[p], studies=[study], occurred_at=when)
        elif r < 0.99:
            event = security_alert_event(user=user, gateway_id="compliance-gateway",
                                         alert_type=EventTypeCode.ACCESS_CONTROL_DECISION, description="denied",
                                         resource="dicomweb:/studies", patients=[p], occurred_at=when)
        else:
            event = export_event(user=user, recipient="mailto:irb@univ.example", purpose="HRESCH", patients=[p],
                                 studies=[study], occurred_at=when)
        doc = to_document(event, SOURCE)
        del doc["atna.xml"]
        yield doc


def _when(doc: dict) -> datetime:
    return datetime.fromisoformat(doc["@timestamp"].replace("Z", "+00:00"))


def _send(client: Elasticsearch, chunk: list[dict]) -> int:
    """One bulk request; on a lost connection wait for the node and resend (ids make it idempotent)."""
    if not chunk:
        return 0
    deadline = time.monotonic() + 600
    while True:
        try:
            _, errors = bulk(client, chunk, raise_on_error=False, max_retries=3)
        except TransportConnectionError:
            if time.monotonic() > deadline:
                raise
            print("  Elasticsearch unreachable, waiting to resend ...", flush=True)
            time.sleep(5)
            continue
        real = [e for e in errors if next(iter(e.values())).get("status") != 409]  # 409: already stored
        if real:
            raise RuntimeError(f"bulk load refused documents: {real[:3]}")
        return len(chunk)


def load(client: Elasticsearch, es_url: str, prefix: str, n_events: int, n_patients: int, seed: int) -> float:
    ElasticsearchAuditSink(es_url, prefix).ensure_ready()
    for month in range(1, 13):
        index = f"{prefix}-2025.{month:02d}"
        client.indices.create(index=index, settings={"index.refresh_interval": "-1"})
    t0 = time.perf_counter()
    done = 0
    chunk: list[dict] = []
    for doc in synthetic(n_events, n_patients, seed):
        chunk.append({"_op_type": "create", "_index": index_name(prefix, _when(doc)), "_id": doc["event.uuid"],
                      "_source": doc})
        if len(chunk) == 2000:
            done += _send(client, chunk)
            chunk = []
            if done % 100_000 == 0:
                print(f"  loaded {done} events ({done / (time.perf_counter() - t0):.0f}/s)", flush=True)
    done += _send(client, chunk)
    client.indices.put_settings(index=f"{prefix}-*", settings={"index.refresh_interval": "1s"})
    client.indices.refresh(index=f"{prefix}-*")
    return time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure(client: Elasticsearch, prefix: str, patients: list[str]) -> tuple[list[float], list[float], list[int]]:
    service = ReportService(AuditQueryService(client, prefix), organization="Bench Hospital")
    report_ms: list[float] = []
    base_ms: list[float] = []
    rows: list[int] = []
    for pid in patients:
        t0 = time.perf_counter()
        client.search(index=f"{prefix}-*", query={"term": {"patient.ids": pid}}, size=10_000,
                      source_excludes=["atna.xml"], track_total_hits=False)
        base_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        report = service.run("patient-access", patient=pid)
        render(report, "json")
        report_ms.append((time.perf_counter() - t0) * 1000)
        rows.append(len(report.rows))
    return report_ms, base_ms, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--patients", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=200, help="report runs per patient group")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the indices (print the prefix)")
    parser.add_argument("--reuse", metavar="PREFIX", help="measure over indices loaded by an earlier --keep run")
    args = parser.parse_args()

    settings = load_settings()
    client = Elasticsearch(settings.elasticsearch_url, request_timeout=300)
    prefix = args.reuse or f"bench-report-{uuid.uuid4().hex[:8]}"
    try:
        if not args.reuse:
            print(f"loading {args.events} events into {prefix}-* ...", flush=True)
            seconds = load(client, settings.elasticsearch_url, prefix, args.events, args.patients, args.seed)
            print(f"loaded in {seconds:.0f} s ({args.events / seconds:.0f} events/s)")
        count = client.count(index=f"{prefix}-*")["count"]
        stats = client.indices.stats(index=f"{prefix}-*", metric="store")["_all"]["primaries"]["store"]
        print(f"{count} events in {prefix}-*, {stats['size_in_bytes'] / 2**20:.0f} MiB on disk")
        rnd = random.Random(args.seed + 1)
        groups = {
            "ordinary patient": [patient_id("P", rnd.randrange(args.patients)) for _ in range(args.queries)],
            "frequent patient": [patient_id("F", rnd.randrange(100)) for _ in range(args.queries)],
        }
        measure(client, prefix, groups["ordinary patient"][:20])  # warm caches, JIT, connections
        result = {}
        for name, pids in groups.items():
            report_ms, base_ms, rows = measure(client, prefix, pids)
            result[name] = {
                "runs": len(pids), "rows_mean": statistics.mean(rows),
                "report_p50_ms": round(pct(report_ms, 0.5), 1), "report_p95_ms": round(pct(report_ms, 0.95), 1),
                "report_max_ms": round(max(report_ms), 1),
                "es_term_query_p50_ms": round(pct(base_ms, 0.5), 1),
                "es_term_query_p95_ms": round(pct(base_ms, 0.95), 1),
                "ratio_p95_report_vs_es": round(pct(report_ms, 0.95) / max(pct(base_ms, 0.95), 0.001), 2),
            }
            r = result[name]
            print(f"{name:17s} rows~{r['rows_mean']:.0f}: report p50 {r['report_p50_ms']} ms, p95 "
                  f"{r['report_p95_ms']} ms, max {r['report_max_ms']} ms | bare ES term query p50 "
                  f"{r['es_term_query_p50_ms']} ms, p95 {r['es_term_query_p95_ms']} ms | ratio p95 "
                  f"{r['ratio_p95_report_vs_es']}x | target p95 < 300 ms: "
                  f"{'met' if r['report_p95_ms'] < 300 else 'NOT met'}")
        print(json.dumps({"events": count, "prefix": prefix, **result}))
    finally:
        if not args.keep:
            # The cluster may refuse wildcard deletes (action.destructive_requires_name): name each index.
            names = sorted(client.indices.get(index=f"{prefix}-*", allow_no_indices=True))
            for i in range(0, len(names), 50):
                client.indices.delete(index=",".join(names[i:i + 50]))
            client.options(ignore_status=404).indices.delete_index_template(name=f"{prefix}-events")
            print(f"deleted {prefix}-*")
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
