"""STOW-RS throughput into an encrypted Orthanc (the storage plugin) against a plaintext Orthanc.

Both are started by this script, in the same run, from the stack's Orthanc template with their own
temporary state directories and ports, identical except for the plugin (``PythonScript`` and
``MaximumStorageCacheSize: 0``, as ``deploy/local/up`` renders it). The encrypted one gets its own
temporary key store (local keyring, fresh patient index key), created as ``up`` does. Each round
STOWs the same number of unique instances (by default unique patients, so every instance also
creates a data key: the worst case) directly to each archive, alternating which goes first; the
best round per archive counts.

    .venv/bin/python benchmarks/stow_encrypted.py [--instances 200] [--rounds 3] [--concurrency 1 2 4]
        [--instances-per-patient 1] [--plugin-baseline]

Durability is the same on both sides: plaintext Orthanc syncs every file it stores before recording
it (``SyncStorageArea``, on by default since Orthanc 1.7.4: ``fdatasync``), and so does the plugin,
plus the key database's durable commit of each new data key. The encrypted archive loads the storage
shim (``deploy/orthanc/compliance_storage_shim.c``, built by ``deploy/local/up`` into the stack's
``orthanc/``) when it is built, as the stack does: a storage area with range reads, so one file per
instance. Without it (``--no-shim``, or not built), orthanc-python 4.0's storage area has no range
reads and Orthanc stores a second file per instance (``dicom-until-pixel-data``); the files each
archive stored per instance are printed.
``--plugin-baseline`` adds a third archive whose Python storage plugin writes plaintext the way
Orthanc's own storage does (open at the final path, write, ``fdatasync``): the cost of the plugin
route itself. ``--instances-per-patient N`` STOWs N instances per patient (one study), so one new
data key per N instances.

It also prints each archive's CPU time per stored instance (user + system of the Orthanc process,
``/proc/PID/stat``, over all rounds): once the cores are saturated the throughput ratio is the ratio of
these, and they show where a run's ratio came from.

Run as root, the archives run as the stack user (like deploy/local/up); otherwise as yourself.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compliance.demo import multipart_related  # noqa: E402
from tests.integration.dicom_samples import unique_instance  # noqa: E402

USER = "compliance-stack"
PASSWORD = secrets.token_hex(16)
#: The storage shim as deploy/local/up builds it; None: the encrypted archive runs without it.
SHIM: Path | None = None

#: ``--plugin-baseline``: plaintext through orthanc-python's storage area, written as Orthanc's own
#: filesystem storage writes (the file at its final path, then fdatasync).
PLAINTEXT_PLUGIN = """
import json, os
import orthanc
ROOT = json.loads(orthanc.GetConfiguration())["StorageDirectory"]
def _path(uuid):
    return os.path.join(ROOT, uuid[0:2], uuid[2:4], uuid)
def create(uuid, content_type, data):
    path = _path(uuid)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fdatasync(fd)
    finally:
        os.close(fd)
def read(uuid, content_type):
    with open(_path(uuid), "rb") as fh:
        return fh.read()
def remove(uuid, content_type):
    try:
        os.unlink(_path(uuid))
    except FileNotFoundError:
        pass
orthanc.RegisterStorageArea(create, read, remove)
"""


def _run_as() -> list[str]:
    if os.geteuid() == 0:
        return ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--init-groups"]
    return []


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_orthanc(base: Path, *, encrypted: bool, plugin_baseline: bool = False) -> tuple[subprocess.Popen, str]:
    cfg = json.loads((ROOT / "deploy/orthanc/orthanc.json").read_text())
    port = _free_port()
    for d in ("storage", "index", "tmp", "stack"):
        (base / d).mkdir(parents=True)
    cfg.update(HttpPort=port, RegisteredUsers={"gateway": PASSWORD}, StorageDirectory=str(base / "storage"),
               IndexDirectory=str(base / "index"), TemporaryDirectory=str(base / "tmp"))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(base), "COMPLIANCE_STACK_DIR": str(base / "stack"),
           "COMPLIANCE_ARCHIVE_PATIENT_INDEX_KEY": secrets.token_hex(32),
           "COMPLIANCE_ENVIRONMENT": "development"}  # the plugin's Settings(); production is the default
    if encrypted or plugin_baseline:
        script = ROOT / "compliance/archive/orthanc_plugin.py"
        if plugin_baseline:
            script = base / "plaintext_plugin.py"
            script.write_text(PLAINTEXT_PLUGIN)
        if encrypted and SHIM is not None:
            cfg["Plugins"].append(str(SHIM))  # before the Python plugin, as deploy/local/up renders it
        cfg["Plugins"].append("/usr/share/orthanc/plugins/libOrthancPython.so")
        cfg.update(PythonScript=str(script), PythonVerbose=False, MaximumStorageCacheSize=0)
    (base / "orthanc.json").write_text(json.dumps(cfg))
    if os.geteuid() == 0:
        shutil.chown(base, USER, USER)
        for p in base.rglob("*"):
            shutil.chown(p, USER, USER)
    if encrypted:
        subprocess.run([*_run_as(), "env", f"PYTHONPATH={ROOT}:{ROOT}/.venv/lib/python3.11/site-packages",
                        "/usr/bin/python3", "-m", "compliance.archive.keystore_setup"], env=env, cwd=base, check=True,
                       capture_output=True)
    log = open(base / "orthanc.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([*_run_as(), "/usr/sbin/Orthanc", str(base / "orthanc.json")], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if httpx.get(f"{url}/system", auth=("gateway", PASSWORD), timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit(f"Orthanc did not start:\n{(base / 'orthanc.log').read_text()[-2000:]}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (``/proc/PID/stat``, all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stow_all(url: str, bodies: list[tuple[bytes, str]], concurrency: int) -> float:
    with httpx.Client(auth=("gateway", PASSWORD), timeout=60,
                      limits=httpx.Limits(max_connections=concurrency)) as client:
        def one(item: tuple[bytes, str]) -> None:
            r = client.post(f"{url}/dicom-web/studies", content=item[0],
                            headers={"Content-Type": item[1], "Accept": "application/dicom+json"})
            if r.status_code != 200:
                raise SystemExit(f"STOW answered {r.status_code}: {r.text[:300]}")
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, bodies))
        return time.perf_counter() - t0


def bodies_for(args: argparse.Namespace) -> list[tuple[bytes, str]]:
    out = []
    for i in range(args.instances):
        if i % args.instances_per_patient == 0:
            patient, study = f"BENCH-{secrets.token_hex(6)}", None
        sample = unique_instance(args.sample, patient_id=patient, study_uid=study)
        study = sample.study_uid
        out.append(multipart_related([sample.data]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--sample", default="CT_small.dcm")
    ap.add_argument("--instances-per-patient", type=int, default=1,
                    help="instances per patient (one study each); 1: every instance creates a data key")
    ap.add_argument("--no-shim", action="store_true",
                    help="encrypted archive without the storage shim (two files per instance)")
    ap.add_argument("--plugin-baseline", action="store_true",
                    help="also measure plaintext through a Python storage plugin (the plugin route's own cost)")
    args = ap.parse_args()
    global SHIM
    from compliance.config import load_settings

    built = load_settings().stack_dir / "orthanc" / "libComplianceStorageShim.so"
    SHIM = built if built.is_file() and not args.no_shim else None
    print(f"storage shim: {SHIM or 'not used'}")
    if args.instances_per_patient < 1:
        ap.error("--instances-per-patient must be at least 1")
    tmp = Path(tempfile.mkdtemp(prefix="stow-bench-"))
    os.chmod(tmp, 0o755)  # noqa: S103 - the archives run as the stack user and must traverse it
    procs = []
    try:
        archives = {}
        plain, archives["plaintext"] = start_orthanc(tmp / "plain", encrypted=False)
        procs.append(plain)
        if args.plugin_baseline:
            base, archives["plaintext-plugin"] = start_orthanc(tmp / "plaintext-plugin", encrypted=False,
                                                               plugin_baseline=True)
            procs.append(base)
        enc, archives["encrypted"] = start_orthanc(tmp / "encrypted", encrypted=True)
        procs.append(enc)
        pids = {"plaintext": plain.pid, "encrypted": enc.pid}
        if args.plugin_baseline:
            pids["plaintext-plugin"] = base.pid
        size = len(unique_instance(args.sample).data)
        print(f"{args.instances} unique instances of {args.sample} ({size} bytes) per round, "
              f"{args.instances_per_patient} per patient, best of {args.rounds}")
        print("| concurrency | archive | instances/s | MB/s |")
        print("| --- | --- | --- | --- |")
        ratios = {}
        cpu: dict[int, dict[str, float]] = {}
        for c in args.concurrency:
            best = dict.fromkeys(archives, float("inf"))
            cpu[c] = dict.fromkeys(archives, 0.0)
            for r in range(args.rounds):
                order = list(archives.items())
                if r % 2:
                    order.reverse()
                for name, url in order:
                    bodies = bodies_for(args)
                    before = cpu_seconds(pids[name])
                    best[name] = min(best[name], stow_all(url, bodies, c))
                    cpu[c][name] += cpu_seconds(pids[name]) - before
            for name in archives:
                rate = args.instances / best[name]
                print(f"| {c} | {name} | {rate:.1f} | {rate * size / 1e6:.2f} |")
            ratios[c] = {name: best["plaintext"] / best[name] for name in archives if name != "plaintext"}
        for c, by_name in cpu.items():
            per = {name: 1e3 * seconds / (args.instances * args.rounds) for name, seconds in by_name.items()}
            print(f"concurrency {c}: archive CPU per instance (user + system, all rounds): "
                  + ", ".join(f"{name} {ms:.2f} ms" for name, ms in per.items()))
        for c, by_name in ratios.items():
            for name, ratio in by_name.items():
                target = " (target >= 0.9x)" if name == "encrypted" else ""
                print(f"concurrency {c}: {name}/plaintext throughput = {ratio:.2f}x{target}")
        stored_instances = args.instances * args.rounds * len(args.concurrency)
        dirs = {"plaintext": "plain", "plaintext-plugin": "plaintext-plugin", "encrypted": "encrypted"}
        for name in archives:
            files = [p for p in (tmp / dirs[name] / "storage").rglob("*") if p.is_file()]
            print(f"{name}: {len(files) / stored_instances:.2f} files stored per instance")
        stored = [p for p in (tmp / "encrypted" / "storage").rglob("*") if p.is_file()]
        assert stored and all(p.read_bytes()[:4] == b"CGSE" for p in stored), "encrypted archive stored plaintext"
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
