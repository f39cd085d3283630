"""WADO-RS retrieval of a ~0.5 MB instance: directly from Orthanc vs through the gateway, same run.

Needs the local stack (deploy/local/up) and wrk (Debian package ``wrk``). Starts its own gateway
(``compliance serve --workers N``, N = cores by default, its own SQLite outbox, audit shipped to
Elasticsearch under the index prefix ``bench-audit``, retrieve delegation on) and its nginx front
(``compliance front``, as ``deploy/local/gateway`` deploys it), stores one synthetic 512x512x16-bit
instance through it, then for each concurrency runs wrk, one path after the other, against

    direct:   Orthanc's DICOMweb, HTTP Basic (the gateway's own archive credentials)
    gateway:  the gateway's own listener, a Keycloak bearer token (verified, authorized, audited);
              the gateway relays the bytes itself (aiohttp -> uvicorn)
    front:    the nginx front, the same token; the gateway decides and audits, nginx pushes the
              bytes (X-Accel-Redirect, compliance/dicomweb/front.py): the deployed configuration

and prints p50/p95 latency and throughput for each, and their ratios to direct. Every gateway and
front request is a real audited retrieve: the script checks afterwards that the outbox holds one
event per request.

    .venv/bin/python benchmarks/gateway_overhead.py [--duration 10] [--concurrency 1 16]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compliance.config import load_settings  # noqa: E402
from compliance.demo import multipart_related, synthetic_instance  # noqa: E402

WRK_LUA = """
done = function(summary, latency, requests)
  io.write(string.format("RESULT requests=%d duration_us=%d bytes=%d errors=%d non2xx=%d p50=%d p95=%d p99=%d\\n",
    summary.requests, summary.duration, summary.bytes,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def bench_instance() -> tuple[bytes, str, str, str]:
    """One 512x512x16-bit CT (~0.5 MB) with noise pixels, so nothing compresses it away."""
    noise = np.random.default_rng(7).integers(0, 4096, (512, 512), dtype=np.uint16).tobytes()
    return synthetic_instance(patient_id="BENCH-0001", patient_name="Bench^Patient", pixel_fill=noise)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(base: str, log: Path, attempts: int = 120) -> None:
    """Until ``base/healthz`` answers 200; exits with the log's tail otherwise."""
    for _ in range(attempts):
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(log.read_text()[-3000:])


def run_wrk(url: str, header: str, concurrency: int, duration: int, lua: Path) -> dict[str, float]:
    threads = min(concurrency, 2)
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{duration}s", "--timeout", "30s", "-s", str(lua),
         "-H", header, "-H", 'Accept: multipart/related; type="application/dicom"; transfer-syntax=*', url],
        capture_output=True, text=True, check=True,
    ).stdout
    m = re.search(r"RESULT (.*)", out)
    if not m:
        raise SystemExit(f"wrk printed no result:\n{out}")
    vals = {k: float(v) for k, v in (kv.split("=") for kv in m.group(1).split())}
    if vals["errors"] or vals["non2xx"]:
        raise SystemExit(f"wrk saw errors against {url}: {vals}")
    secs = vals["duration_us"] / 1e6
    return {"requests": vals["requests"], "rps": vals["requests"] / secs, "mbps": vals["bytes"] / secs / 1e6,
            "p50_ms": vals["p50"] / 1000, "p95_ms": vals["p95"] / 1000, "p99_ms": vals["p99"] / 1000}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")
    settings = load_settings()
    archive_auth = (settings.archive_username, settings.archive_password.get_secret_value())
    tmp = Path(tempfile.mkdtemp(prefix="bench-gw-"))
    measured = False
    db = tmp / "bench.db"
    port = free_port()
    front_port = free_port()
    env = {**os.environ, "COMPLIANCE_PORT": str(port), "COMPLIANCE_DATABASE_URL": f"sqlite:///{db}",
           "COMPLIANCE_AUDIT_INDEX_PREFIX": "bench-audit", "COMPLIANCE_RETRIEVE_DELEGATION": "true",
           "COMPLIANCE_PUBLIC_ADDRESS": f"127.0.0.1:{front_port}"}
    log = (tmp / "gateway.log").open("wb")
    gw = subprocess.Popen([sys.executable, "-m", "compliance.cli", "serve", "--port", str(port),
                           "--workers", str(args.workers)], cwd=ROOT, env=env,
                          stdout=log, stderr=subprocess.STDOUT)
    front = subprocess.Popen([sys.executable, "-m", "compliance.cli", "front", "--listen", f"127.0.0.1:{front_port}",
                              "--backend", f"127.0.0.1:{port}", "--state-dir", str(tmp / "front")], cwd=ROOT,
                             env=env,
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, tmp / "gateway.log")
        wait_healthy(f"http://127.0.0.1:{front_port}", tmp / "gateway.log")

        def token(user: str) -> str:
            r = httpx.post(f"{settings.keycloak_url}/realms/imaging/protocol/openid-connect/token",
                           data={"grant_type": "password", "client_id": "compliance-cli", "username": user,
                                 "password": f"demo-{user}"}, timeout=30)
            r.raise_for_status()
            return str(r.json()["access_token"])

        data, study, series, instance = bench_instance()
        body, ct = multipart_related([data])
        r = httpx.post(f"{base}/dicom-web/studies", content=body, timeout=60,
                       headers={"Authorization": f"Bearer {token('tom')}", "Content-Type": ct})
        r.raise_for_status()
        path = f"/studies/{study}/series/{series}/instances/{instance}"
        direct_url = settings.archive_dicomweb_url + path
        gateway_url = f"{base}/dicom-web{path}"
        front_url = f"http://127.0.0.1:{front_port}/dicom-web{path}"
        basic = "Authorization: Basic " + base64.b64encode(":".join(archive_auth).encode()).decode()
        bearer = f"Authorization: Bearer {token('rita')}"  # tokens live 300 s: enough for the run
        lua = tmp / "report.lua"
        lua.write_text(WRK_LUA)
        before = sqlite3.connect(db).execute("select count(*) from audit_outbox").fetchone()[0]
        results = []
        for c in args.concurrency:
            run_wrk(direct_url, basic, c, 2, lua)  # warm-up every path
            run_wrk(gateway_url, bearer, c, 2, lua)
            run_wrk(front_url, bearer, c, 2, lua)
            direct = run_wrk(direct_url, basic, c, args.duration, lua)
            through = run_wrk(gateway_url, bearer, c, args.duration, lua)
            fronted = run_wrk(front_url, bearer, c, args.duration, lua)
            row = {"concurrency": c, "direct": direct, "gateway": through, "front": fronted}
            for name, m in (("gateway", through), ("front", fronted)):
                row[name] |= {"throughput_ratio": m["rps"] / direct["rps"],
                              "added_p50_ms": m["p50_ms"] - direct["p50_ms"],
                              "added_p95_ms": m["p95_ms"] - direct["p95_ms"]}
            results.append(row)
        gw_requests = sum(r[name]["requests"] for r in results for name in ("gateway", "front"))
        after = sqlite3.connect(db).execute("select count(*) from audit_outbox").fetchone()[0]
        audited = after - before
        # A released retrieve the archive refused comes back to the gateway (two events, the second
        # a failure): then the front measured the fallback, not itself.
        refused = sqlite3.connect(db).execute(
            "select count(*) from audit_outbox where event_code = '110104' "
            "and json_extract(document, '$.\"event.outcome\"') != 0").fetchone()[0]
        if refused:
            raise SystemExit(f"{refused} audited retrieves were refused by the archive: see {tmp / 'front'}")
        measured = True
    finally:
        front.terminate()
        front.wait(timeout=30)
        gw.terminate()
        gw.wait(timeout=30)
        log.close()
        # by name: the cluster refuses wildcard deletes (action.destructive_requires_name)
        es = settings.elasticsearch_url
        found = httpx.get(f"{es}/bench-audit-*,bench-audit.checkpoints", timeout=30,
                          params={"ignore_unavailable": "true", "allow_no_indices": "true"})
        for index in found.json() if found.status_code == 200 else []:
            httpx.delete(f"{es}/{index}", timeout=30)
        # The run's database, logs and front state: kept only when the run failed, to read them.
        if measured:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"the run failed; its database and logs are kept in {tmp}", file=sys.stderr)
    print(f"instance size: {len(data) / 1e6:.2f} MB, gateway workers: {args.workers}, duration {args.duration}s each")
    print(f"{'conc':>4} {'path':>8} {'req/s':>9} {'MB/s':>8} {'p50 ms':>8} {'p95 ms':>8}")
    for r in results:
        for name in ("direct", "gateway", "front"):
            m = r[name]
            print(f"{r['concurrency']:>4} {name:>8} {m['rps']:>9.1f} {m['mbps']:>8.1f} "
                  f"{m['p50_ms']:>8.2f} {m['p95_ms']:>8.2f}")
        for name in ("gateway", "front"):
            m = r[name]
            print(f"{r['concurrency']:>4} {name + '/d':>8} {m['throughput_ratio']:>9.2f}x  "
                  f"added p50 {m['added_p50_ms']:+.2f} ms, p95 {m['added_p95_ms']:+.2f} ms")
    # wrk counts only completed requests; warm-up requests are audited too
    print(f"audit events recorded for gateway requests: {audited} (wrk counted {int(gw_requests)} in the timed runs)")
    print("JSON " + json.dumps({"benchmark": "gateway_overhead", "instance_bytes": len(data),
                                "workers": args.workers, "results": results, "audited": audited}))


if __name__ == "__main__":
    main()
