"""`compliance audit verify`: its cost per event with the per-position outbox comparison (issue 12 item 4)
against the count-only verify it replaced, measured in the same run over the same trail.

Prepared once: ``--events`` audit documents (110112 queries with their ATNA XML, as the gateway renders
them) recorded in a fresh SQLite outbox and shipped to a fresh index prefix of the local stack's
Elasticsearch by the AuditShipper with the checkpoint signer, a thousand at a time, so the verification
reads what a real trail holds (a signed checkpoint per thousand events to check). Then ``--rounds``
rounds, each verifying the whole trail once with the old code and once with the current one, alternating
which goes first, each in a process of its own (``--child``): the old ``compliance/audit/verify.py`` and
``chain.py`` are loaded from git (``--baseline``, default the last revision with the count-only verify);
everything else is the checkout's. Each child reports wall time, its own CPU time (user + system, the
Python side only: Elasticsearch's own CPU is not in it), and its peak RSS. Reported: medians, the
new/old ratios, CPU seconds per 1,000 events.

    .venv/bin/python benchmarks/audit_verify.py [--events 20000] [--rounds 3] [--baseline REV]

Needs the local stack's Elasticsearch (deploy/local/up). Uses and then deletes its own indices and
temporary directory. The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: The last revision whose verify compared the repository with the outbox by count only.
BASELINE = "4326dcf"


def load_old_verify(revision: str) -> types.ModuleType:
    """The baseline's chain.py and verify.py, installed under their own names before anything imports them."""
    import compliance.audit

    module = None
    for name in ("chain", "verify"):
        path = f"compliance/audit/{name}.py"
        source = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout
        module = types.ModuleType(f"compliance.audit.{name}")
        module.__file__ = str(ROOT / path)
        sys.modules[module.__name__] = module
        setattr(compliance.audit, name, module)
        exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)  # noqa: S102 - our own history
    assert module is not None
    return module


def child(args: argparse.Namespace) -> None:
    verify = load_old_verify(args.baseline) if args.child == "old" else None
    from compliance.audit.checkpoints import load_public_key
    from compliance.audit.elasticsearch import ElasticsearchAuditSink
    from compliance.audit.outbox import SqlAuditOutbox
    from compliance.db.session import make_engine

    if verify is None:
        from compliance.audit import verify
    engine = make_engine(args.db)
    outbox = SqlAuditOutbox(engine)
    sink = ElasticsearchAuditSink(args.es, args.prefix, request_timeout=120)
    key = load_public_key(Path(args.key))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu0, t0 = time.process_time(), time.perf_counter()
    result = verify.verify_repository(sink.client, args.prefix, outbox, public_key=key, engine=engine)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(json.dumps({"variant": args.child, "wall_s": wall, "cpu_s": cpu, "checked": result.checked,
                      "intact": result.intact, "checkpoints": result.checkpoints,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_before_mb": rss_before / 1024, "summary": result.summary()}))


def prepare(es: str, events: int, tmp: Path) -> tuple[str, str, str]:
    """A trail of ``events`` shipped events with signed checkpoints: (database URL, prefix, key file)."""
    from compliance.audit.atna import AuditSource
    from compliance.audit.checkpoints import (
        AuditCheckpointer,
        CheckpointSigner,
        ElasticsearchCheckpoints,
        SqlCheckpointStore,
        generate_key_file,
    )
    from compliance.audit.codes import Outcome
    from compliance.audit.documents import to_document
    from compliance.audit.elasticsearch import ElasticsearchAuditSink
    from compliance.audit.events import query_event
    from compliance.audit.message import PatientRef, UserRef
    from compliance.audit.outbox import OutboxEntry, SqlAuditOutbox
    from compliance.audit.shipper import AuditShipper
    from compliance.db.migrate import upgrade
    from compliance.db.session import make_engine

    db, prefix, key = f"sqlite:///{tmp / 'verify.db'}", f"bench-verify-{uuid.uuid4().hex[:8]}", tmp / "cp.pem"
    upgrade(db)
    generate_key_file(key)
    engine = make_engine(db)
    outbox = SqlAuditOutbox(engine)
    source = AuditSource(source_id="compliance-gateway", enterprise_site_id="bench-hospital")
    users = [UserRef(user_id=f"sub-{i}", username=f"user{i}", client_id="compliance-cli", roles=("clinician",),
                     source_address=f"10.0.0.{i}") for i in range(8)]
    start = datetime.now(UTC) - timedelta(seconds=events)
    sink = ElasticsearchAuditSink(es, prefix, request_timeout=120)
    sink.ensure_ready()
    checkpointer = AuditCheckpointer(SqlCheckpointStore(engine), CheckpointSigner.from_file(key),
                                     publish=ElasticsearchCheckpoints(sink.client, prefix).publish,
                                     every_events=1000, every_seconds=3600)
    shipper = AuditShipper(outbox, sink, batch_size=1000, checkpointer=checkpointer)
    batch: list[OutboxEntry] = []
    for i in range(events):
        event = query_event(user=users[i % 8], gateway_id="compliance-gateway", outcome=Outcome.SUCCESS,
                            query=f"PatientID=P{i % 500}&includefield=all".encode(), sop_class_uid=None,
                            patients=[PatientRef(f"P{i % 500}", f"DOE^JANE{i % 500}")], resource="/dicom-web/studies",
                            occurred_at=start + timedelta(seconds=i))
        batch.append(OutboxEntry(uuid=event.uuid, event_code="110112", occurred_at=event.occurred_at,
                                 document=to_document(event, source)))
        if len(batch) == 1000 or i == events - 1:
            # recorded, shipped and signed a thousand at a time, as a running gateway would
            outbox.append_now(batch)
            batch = []
            while shipper.ship_once() > 0:
                pass
            checkpointer.tick()
    checkpointer.tick(force=True)
    assert outbox.backlog() == 0
    sink.client.indices.refresh(index=f"{prefix}-*")
    outbox.close()
    sink.close()
    engine.dispose()
    return db, prefix, str(key)


def drop(es: str, prefix: str) -> None:
    import httpx

    found = httpx.get(f"{es}/{prefix}-*,{prefix}.checkpoints", timeout=60,
                      params={"ignore_unavailable": "true", "allow_no_indices": "true"})
    for index in found.json() if found.status_code == 200 else []:
        httpx.delete(f"{es}/{index}", timeout=60)
    httpx.delete(f"{es}/_index_template/{prefix}-events", timeout=60)


def run_child(variant: str, es: str, db: str, prefix: str, key: str, baseline: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", variant, "--es", es, "--db", db, "--prefix", prefix,
                          "--key", key, "--baseline", baseline], cwd=ROOT, capture_output=True, text=True,
                         timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"the {variant} verify failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", default=BASELINE, help="git revision of the count-only verify")
    ap.add_argument("--child", choices=("old", "new"), help=argparse.SUPPRESS)
    ap.add_argument("--es", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--prefix", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    from compliance.config import load_settings

    es = load_settings().elasticsearch_url
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        t0 = time.perf_counter()
        db, prefix, key = prepare(es, args.events, Path(tmp))
        print(f"prepared {args.events} shipped events in {time.perf_counter() - t0:.1f} s", flush=True)
        try:
            runs: dict[str, list[dict]] = {"old": [], "new": []}
            for r in range(args.rounds):
                for variant in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    res = run_child(variant, es, db, prefix, key, args.baseline)
                    assert res["checked"] == args.events and res["intact"], res
                    runs[variant].append(res)
                    print(f"round {r + 1} {variant}: {res['wall_s']:.2f} s wall, {res['cpu_s']:.2f} s CPU, "
                          f"peak RSS {res['peak_rss_mb']:.0f} MiB; ...{res['summary'][-110:]}", flush=True)
        finally:
            drop(es, prefix)
    med = statistics.median
    summary = {v: {"wall_s": round(med(x["wall_s"] for x in runs[v]), 3),
                   "cpu_s": round(med(x["cpu_s"] for x in runs[v]), 3),
                   "cpu_s_per_1000_events": round(med(x["cpu_s"] for x in runs[v]) * 1000 / args.events, 4),
                   "peak_rss_mb": round(max(x["peak_rss_mb"] for x in runs[v]), 1)} for v in runs}
    wall_ratio = summary["new"]["wall_s"] / summary["old"]["wall_s"]
    cpu_ratio = summary["new"]["cpu_s"] / summary["old"]["cpu_s"]
    print(f"medians of {args.rounds}: old {summary['old']['wall_s']:.2f} s wall / {summary['old']['cpu_s']:.2f} s CPU "
          f"({summary['old']['cpu_s_per_1000_events']:.3f} CPU s per 1,000 events); new "
          f"{summary['new']['wall_s']:.2f} s / {summary['new']['cpu_s']:.2f} s "
          f"({summary['new']['cpu_s_per_1000_events']:.3f}); new/old wall {wall_ratio:.2f}x, CPU {cpu_ratio:.2f}x")
    print(json.dumps({"benchmark": "audit_verify", "events": args.events, "rounds": args.rounds,
                      "baseline": args.baseline, **summary, "wall_ratio": round(wall_ratio, 3),
                      "cpu_ratio": round(cpu_ratio, 3), "cpus": os.cpu_count(),
                      "python": platform.python_version()}))


if __name__ == "__main__":
    main()
