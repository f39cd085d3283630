"""WADO-RS retrieval of a ~0.5 MB instance: from Orthanc, through a plain proxy, through the gateway; same run.

Needs the local stack (deploy/local/up), wrk (Debian package ``wrk``) and nginx (``nginx-light``). Starts
its own gateway (``compliance serve --workers N``, N = cores by default, its own SQLite outbox, audit
shipped to Elasticsearch under the index prefix ``bench-audit``, retrieve delegation on), its nginx front
(``compliance front``, as ``deploy/local/gateway`` deploys it) and a plain nginx reverse proxy to Orthanc
(its configuration written into the run's temporary directory, nginx stopped at the end), stores one
synthetic 512x512x16-bit instance through the gateway, then for each concurrency runs wrk in rounds
(``--rounds``, 5 by default, sharing ``--duration`` seconds per path): each round runs every path once,
one after the other, in an order rotated from round to round, against

    direct:   Orthanc's DICOMweb, HTTP Basic (the gateway's own archive credentials)
    plain:    a plain nginx reverse proxy to Orthanc, the same Basic credentials passed through: no token
              check, no audit; the proxy settings towards Orthanc are the front's (keepalive, buffers)
    gateway:  the gateway's own listener, a Keycloak bearer token (verified, authorized, audited);
              the gateway relays the bytes itself (aiohttp -> uvicorn)
    front:    the nginx front, the same token; the gateway decides and audits, nginx pushes the
              bytes (X-Accel-Redirect, compliance/dicomweb/front.py): the deployed configuration

and prints for each path throughput, p50/p95 latency (medians over the rounds), its ratio to direct and
to plain (the median and the range of the ratios within each round: on a shared machine the load moves
between rounds, less within one), and the CPU per request of the gateway's processes (``compliance
serve`` and its workers) and of the nginx in the path (the plain proxy's or the front's). CPU is read
from /proc over each wrk run and until the outbox has shipped every event of it to Elasticsearch, so
the shipping counts to the path that caused it.
Every gateway and front request is a real audited retrieve: the script checks afterwards that the
outbox holds one event per request.

    .venv/bin/python benchmarks/gateway_overhead.py [--duration 10] [--rounds 5] [--concurrency 1 16]
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
from statistics import median
from urllib.parse import urlsplit

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compliance.config import load_settings  # noqa: E402
from compliance.demo import synthetic_instance  # noqa: E402
from compliance.dicomweb.front import nginx_binary, write_config  # noqa: E402
from compliance.dicomweb.stow import multipart_related  # noqa: E402

PATHS = ("direct", "plain", "gateway", "front")

WRK_LUA = """
done = function(summary, latency, requests)
  io.write(string.format("RESULT requests=%d duration_us=%d bytes=%d errors=%d non2xx=%d p50=%d p95=%d p99=%d\\n",
    summary.requests, summary.duration, summary.bytes,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""

# The plain proxy: nothing but proxy_pass to Orthanc, with the front's settings towards it
# (compliance/dicomweb/front.py: keepalive, in-memory buffers, one worker, no access log). The client's
# headers, its Basic credentials included, pass through unchanged. /healthz is answered by nginx itself.
PLAIN_PROXY_CONF = """worker_processes 1;
daemon off;
pid {state}/nginx.pid;
error_log {state}/error.log warn;

events {{ worker_connections 4096; }}

http {{
  access_log off;
  client_body_temp_path {state}/client_body;
  proxy_temp_path {state}/proxy;
  fastcgi_temp_path {state}/fastcgi;
  uwsgi_temp_path {state}/uwsgi;
  scgi_temp_path {state}/scgi;
  proxy_max_temp_file_size 0;
  proxy_buffer_size 64k;
  proxy_buffers 32 64k;
  proxy_busy_buffers_size 128k;
  proxy_http_version 1.1;

  upstream orthanc {{
    server {archive};
    keepalive 64;
    keepalive_timeout 800ms;  # Orthanc closes idle connections after 1 s
  }}

  server {{
    listen {listen};
    location = /healthz {{ return 200; }}
    location / {{
      proxy_pass http://orthanc;
      proxy_set_header Host {archive};
      proxy_set_header Connection "";
    }}
  }}
}}
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
    raise SystemExit(log.read_text()[-3000:] if log.exists() else f"{base} never answered; no log at {log}")


def start_plain_proxy(archive_url: str, port: int, state: Path) -> subprocess.Popen[bytes]:
    """nginx in the foreground on 127.0.0.1:``port``, passing everything to the archive; its files in ``state``."""
    archive = urlsplit(archive_url)
    config = write_config(PLAIN_PROXY_CONF.format(state=state, listen=f"127.0.0.1:{port}",
                                                  archive=f"{archive.hostname}:{archive.port}"), state)
    command = [nginx_binary(), "-c", str(config), "-p", str(state), "-e", str(state / "error.log")]
    subprocess.run([*command, "-t", "-q"], check=True)
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (reaped children included), from /proc."""
    parent_and_ticks: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on: the name may hold spaces
        parent_and_ticks[int(entry.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]))  # ppid; u/s/cu/cs time
    children: dict[int, list[int]] = {}
    for child, (parent, _) in parent_and_ticks.items():
        children.setdefault(parent, []).append(child)
    ticks, pending = 0, [pid]
    while pending:
        current = pending.pop()
        ticks += parent_and_ticks.get(current, (0, 0))[1]
        pending.extend(children.get(current, []))
    return ticks / os.sysconf("SC_CLK_TCK")


def wait_shipped(db: Path, timeout: float = 120) -> None:
    """Until every outbox row has been shipped to Elasticsearch."""
    deadline = time.monotonic() + timeout
    with sqlite3.connect(db) as conn:
        while conn.execute("select count(*) from audit_outbox where shipped_at is null").fetchone()[0]:
            if time.monotonic() > deadline:
                raise SystemExit(f"the outbox {db} still holds unshipped events after {timeout:.0f} s")
            time.sleep(0.2)


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


def summarize(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per path over the rounds: the median throughput and latencies, the median (and range) of its ratio and
    added p50 against direct and plain in the same round, and the CPU per request over all rounds' requests."""
    row = {}
    for name in PATHS:
        runs = [r[name] for r in rounds]
        requests = sum(m["requests"] for m in runs)
        m = {key: median(run[key] for run in runs) for key in ("rps", "mbps", "p50_ms", "p95_ms", "p99_ms")}
        m |= {"concurrency": runs[0]["concurrency"], "requests": requests,
              "gateway_cpu_ms_per_request": sum(run["gateway_cpu_s"] for run in runs) * 1000 / requests,
              "nginx_cpu_ms_per_request": sum(run["nginx_cpu_s"] for run in runs) * 1000 / requests}
        for base in ("direct", "plain"):
            ratios = [r[name]["rps"] / r[base]["rps"] for r in rounds]
            m |= {f"ratio_{base}": median(ratios), f"ratio_{base}_min": min(ratios),
                  f"ratio_{base}_max": max(ratios),
                  f"added_p50_vs_{base}_ms": median(r[name]["p50_ms"] - r[base]["p50_ms"] for r in rounds),
                  f"added_p95_vs_{base}_ms": median(r[name]["p95_ms"] - r[base]["p95_ms"] for r in rounds)}
        row[name] = m
    return row


def print_table(results: list[dict[str, dict[str, float]]]) -> None:
    print(f"{'conc':>4} {'path':>8} {'req/s':>7} {'MB/s':>6} {'p50 ms':>7} {'p95 ms':>7} "
          f"{'x direct (range)':>19} {'x plain (range)':>19} {'+p50 direct':>11} {'+p50 plain':>10} "
          f"{'gw CPU ms/req':>13} {'nginx CPU ms/req':>16}")
    for row in results:
        for name in PATHS:
            m = row[name]
            ratios = [f"{m[f'ratio_{base}']:.2f}x ({m[f'ratio_{base}_min']:.2f}-{m[f'ratio_{base}_max']:.2f})"
                      for base in ("direct", "plain")]
            gateway_cpu = f"{m['gateway_cpu_ms_per_request']:.2f}" if name in ("gateway", "front") else "-"
            nginx_cpu = f"{m['nginx_cpu_ms_per_request']:.2f}" if name in ("plain", "front") else "-"
            print(f"{int(m['concurrency']):>4} {name:>8} {m['rps']:>7.1f} {m['mbps']:>6.1f} {m['p50_ms']:>7.2f} "
                  f"{m['p95_ms']:>7.2f} {ratios[0]:>19} {ratios[1]:>19} "
                  f"{m['added_p50_vs_direct_ms']:>+11.2f} {m['added_p50_vs_plain_ms']:>+10.2f} "
                  f"{gateway_cpu:>13} {nginx_cpu:>16}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10, help="seconds per path and concurrency, over all rounds")
    ap.add_argument("--rounds", type=int, default=5, help="each round runs every path once, in a rotated order")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    round_seconds = max(1, args.duration // args.rounds)  # wrk takes whole seconds
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")
    load_before = os.getloadavg()[0]  # other work on a shared machine moves every figure
    settings = load_settings()
    archive_auth = (settings.archive_username, settings.archive_password.get_secret_value())
    tmp = Path(tempfile.mkdtemp(prefix="bench-gw-"))
    measured = False
    db = tmp / "bench.db"
    port = free_port()
    front_port = free_port()
    plain_port = free_port()
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
    plain = start_plain_proxy(settings.archive_url, plain_port, tmp / "plain")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, tmp / "gateway.log")
        wait_healthy(f"http://127.0.0.1:{front_port}", tmp / "gateway.log")
        wait_healthy(f"http://127.0.0.1:{plain_port}", tmp / "plain" / "error.log")

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
        basic = "Authorization: Basic " + base64.b64encode(":".join(archive_auth).encode()).decode()
        bearer = f"Authorization: Bearer {token('rita')}"  # tokens live 300 s: enough for the run
        dicomweb_root = urlsplit(settings.archive_dicomweb_url).path
        targets = {  # path -> (url, credentials, the nginx in it)
            "direct": (settings.archive_dicomweb_url + path, basic, None),
            "plain": (f"http://127.0.0.1:{plain_port}{dicomweb_root}{path}", basic, plain),
            "gateway": (f"{base}/dicom-web{path}", bearer, None),
            "front": (f"http://127.0.0.1:{front_port}/dicom-web{path}", bearer, front),
        }
        lua = tmp / "report.lua"
        lua.write_text(WRK_LUA)
        before = sqlite3.connect(db).execute("select count(*) from audit_outbox").fetchone()[0]

        def measure(name: str, concurrency: int, duration: int) -> dict[str, float]:
            """One wrk run on a path, with the CPU the gateway and the path's nginx spent on it (shipping included)."""
            url, header, nginx = targets[name]

            def cpu() -> tuple[float, float]:
                return tree_cpu_seconds(gw.pid), tree_cpu_seconds(nginx.pid) if nginx else 0.0

            gateway_before, nginx_before = cpu()
            m = run_wrk(url, header, concurrency, duration, lua)
            wait_shipped(db)
            gateway_after, nginx_after = cpu()
            return m | {"concurrency": concurrency, "gateway_cpu_s": gateway_after - gateway_before,
                        "nginx_cpu_s": nginx_after - nginx_before}

        results = []
        for c in args.concurrency:
            for name in PATHS:  # warm-up every path
                measure(name, c, 2)
            rounds = [{name: measure(name, c, round_seconds) for name in PATHS[r % 4:] + PATHS[:r % 4]}
                      for r in range(args.rounds)]
            results.append(summarize(rounds))
        gw_requests = sum(row[name]["requests"] for row in results for name in ("gateway", "front"))
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
        for process in (plain, front, gw):
            process.terminate()
            process.wait(timeout=30)
        log.close()
        # by name: the cluster refuses wildcard deletes (action.destructive_requires_name)
        es = settings.elasticsearch_url
        found = httpx.get(f"{es}/bench-audit-*,bench-audit.checkpoints", timeout=30,
                          params={"ignore_unavailable": "true", "allow_no_indices": "true"})
        for index in found.json() if found.status_code == 200 else []:
            httpx.delete(f"{es}/{index}", timeout=30)
        # The run's database, logs, front and proxy state: kept only when the run failed, to read them.
        if measured:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"the run failed; its database and logs are kept in {tmp}", file=sys.stderr)
    print(f"instance size: {len(data) / 1e6:.2f} MB, gateway workers: {args.workers}, "
          f"{args.rounds} rounds of {round_seconds}s per path, "
          f"{os.cpu_count()} cores, 1-min load average before the run {load_before:.2f}")
    print_table(results)
    # wrk counts only completed requests; warm-up requests are audited too
    print(f"audit events recorded for gateway requests: {audited} (wrk counted {int(gw_requests)} in the timed runs)")
    print("JSON " + json.dumps({"benchmark": "gateway_overhead", "instance_bytes": len(data),
                                "workers": args.workers, "rounds": args.rounds, "round_seconds": round_seconds,
                                "load_before": load_before, "results": results,
                                "audited": audited}))


if __name__ == "__main__":
    main()
