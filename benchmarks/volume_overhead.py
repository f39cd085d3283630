"""What the encrypted volume costs: the same SQLite and file operations on a gocryptfs mount and on the
plain disk beneath it, measured in the same run.

The local stack keeps Orthanc's index, the gateway's audit outbox (SQLite, WAL, synchronous=FULL),
PostgreSQL and Elasticsearch on a gocryptfs volume (deploy/local/lib.sh). This benchmark makes a
throwaway volume of its own, mounted by this process's user like the stack's volumes (gocryptfs never
switches credentials then; the stack's ``phi-gateway`` is mounted exactly so), in a directory on the same
filesystem as the plain side, and runs each workload on both, alternating, ``--rounds`` times:

- ``sqlite_commit``: one ~1 KiB row per transaction, journal_mode=WAL, synchronous=FULL (the outbox's
  pragmas: every commit is a WAL write and an fsync);
- ``sqlite_batch``: 100 such rows per transaction;
- ``sqlite_read``: point reads by primary key on a fresh connection (the index file and its -shm mmap);
- ``small_file``: create, write 4 KiB, fsync, close (a translog or WAL segment's pattern);
- ``seq_write``: 64 MiB in 1 MiB writes, then fsync (a segment merge); ``seq_read``: read it back.

Per workload: wall time per operation on each side (median over rounds), the ratio volume/plain, and
CPU per operation: this process's CPU plus, on the volume, the gocryptfs daemon's (from /proc), which is
where the encryption runs. The last line printed is one JSON object with every number.

    .venv/bin/python benchmarks/volume_overhead.py [--dir DIR] [--rounds 3] [--commits 1000]

Needs gocryptfs and FUSE (Debian gocryptfs fuse3; /dev/fuse). Everything it makes under ``--dir``
(default: a temporary directory) is unmounted and removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
ROW = "x" * 1000


def daemon_pid(cipher: Path) -> int:
    """The gocryptfs process serving ``cipher`` (its command line names the ciphertext directory)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"gocryptfs") and str(cipher).encode() in cmdline:
            return int(pid)
    raise SystemExit(f"no gocryptfs process serves {cipher}")


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def mount(base: Path, extra: list[str]) -> tuple[Path, Path, int]:
    cipher, plain = base / "cipher", base / "mnt"
    cipher.mkdir(mode=0o700)
    plain.mkdir(mode=0o700)
    password = secrets.token_hex(32).encode() + b"\n"
    subprocess.run(["gocryptfs", "-init", "-q", "--", str(cipher)], input=password, check=True, capture_output=True)
    opts = ["-q", "-nosyslog", *extra]
    # the daemon keeps its parent's stdout and stderr open: never a pipe this process would wait on
    subprocess.run(["gocryptfs", *opts, "--", str(cipher), str(plain)], input=password, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cipher, plain, daemon_pid(cipher)


def unmount(plain: Path) -> None:
    for cmd in (["fusermount3", "-u", str(plain)], ["umount", str(plain)]):
        if subprocess.run(cmd, capture_output=True).returncode == 0:
            return
    print(f"warning: could not unmount {plain}", file=sys.stderr)


# --- workloads: each takes a fresh directory and returns how many operations it did -----------------

def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def sqlite_commit(d: Path, n: int) -> int:
    conn = _connect(d / "outbox.db")
    conn.execute("CREATE TABLE IF NOT EXISTS e (id INTEGER PRIMARY KEY, body TEXT)")
    for i in range(n):
        conn.execute("BEGIN")
        conn.execute("INSERT INTO e (body) VALUES (?)", (f"{i}{ROW}",))
        conn.execute("COMMIT")
    conn.close()
    return n


def sqlite_batch(d: Path, n: int) -> int:
    conn = _connect(d / "batch.db")
    conn.execute("CREATE TABLE IF NOT EXISTS e (id INTEGER PRIMARY KEY, body TEXT)")
    for start in range(0, n * 10, 100):
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO e (body) VALUES (?)", [(f"{i}{ROW}",) for i in range(start, start + 100)])
        conn.execute("COMMIT")
    conn.close()
    return n * 10


def sqlite_read(d: Path, n: int) -> int:
    db = d / "outbox.db"  # written by sqlite_commit in the same directory
    conn = _connect(db)
    top = conn.execute("SELECT max(id) FROM e").fetchone()[0]
    step = max(1, top // n)
    for i in range(n):
        conn.execute("SELECT body FROM e WHERE id = ?", (1 + (i * step) % top,)).fetchone()
    conn.close()
    return n


def small_file(d: Path, n: int) -> int:
    block = os.urandom(4096)
    for i in range(n):
        fd = os.open(d / f"small-{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, block)
        os.fsync(fd)
        os.close(fd)
    return n


def seq_write(d: Path, n: int) -> int:
    chunk = os.urandom(MIB)
    fd = os.open(d / "big", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for _ in range(64):
        os.write(fd, chunk)
    os.fsync(fd)
    os.close(fd)
    return 64


def seq_read(d: Path, n: int) -> int:
    with open(d / "big", "rb", buffering=0) as f:
        while f.read(MIB):
            pass
    return 64


WORKLOADS: list[tuple[str, str, Callable[[Path, int], int]]] = [
    ("sqlite_commit", "commit", sqlite_commit),
    ("sqlite_batch", "row", sqlite_batch),
    ("sqlite_read", "read", sqlite_read),
    ("small_file", "file", small_file),
    ("seq_write", "MiB", seq_write),
    ("seq_read", "MiB", seq_read),
]


def measure(fn: Callable[[Path, int], int], d: Path, n: int, daemon: int | None) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (this process + the gocryptfs daemon) and operations of one run."""
    cpu0 = time.process_time() + (process_cpu(daemon) if daemon else 0.0)
    t0 = time.perf_counter()
    ops = fn(d, n)
    wall = time.perf_counter() - t0
    cpu = time.process_time() + (process_cpu(daemon) if daemon else 0.0) - cpu0
    return wall, cpu, ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="where the plain side and the volume are made")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--commits", type=int, default=1000, help="operations per SQLite/small-file workload")
    parser.add_argument("--option", action="append", default=[], metavar="-FLAG",
                        help="an extra gocryptfs mount option to try (repeatable), e.g. --option=-kernel_cache")
    args = parser.parse_args()
    if shutil.which("gocryptfs") is None:
        raise SystemExit("gocryptfs is not installed (apt-get install gocryptfs fuse3)")

    base = Path(tempfile.mkdtemp(prefix="volume-overhead-", dir=args.dir))
    cipher, mnt, daemon = mount(base, args.option)
    results: dict[str, dict[str, list[float]]] = {name: {k: [] for k in ("plain_wall", "plain_cpu", "volume_wall",
                                                                          "volume_cpu")} for name, _, _ in WORKLOADS}
    try:
        for r in range(args.rounds):
            sides = [("plain", base / f"plain-{r}", None), ("volume", mnt / f"round-{r}", daemon)]
            if r % 2:
                sides.reverse()  # alternate which side runs first
            for side, d, pid in sides:
                d.mkdir()
                for name, _, fn in WORKLOADS:
                    wall, cpu, ops = measure(fn, d, args.commits, pid)
                    results[name][f"{side}_wall"].append(wall / ops)
                    results[name][f"{side}_cpu"].append(cpu / ops)
                shutil.rmtree(d)
    finally:
        unmount(mnt)
        shutil.rmtree(base, ignore_errors=True)

    summary: dict[str, object] = {"gocryptfs": subprocess.run(["gocryptfs", "-version"], capture_output=True,
                                                              text=True).stdout.split(";")[0].strip(),
                                  "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
                                  "options": args.option, "rounds": args.rounds, "commits": args.commits,
                                  "workloads": {}}
    print(f"{'workload':<14} {'unit':<6} {'plain us/op':>12} {'volume us/op':>13} {'ratio':>6} "
          f"{'plain cpu us':>13} {'volume cpu us':>14} {'cpu ratio':>9}")
    for name, unit, _ in WORKLOADS:
        m = {k: statistics.median(v) * 1e6 for k, v in results[name].items()}
        ratio, cpu_ratio = m["volume_wall"] / m["plain_wall"], m["volume_cpu"] / max(m["plain_cpu"], 1e-9)
        print(f"{name:<14} {unit:<6} {m['plain_wall']:>12.1f} {m['volume_wall']:>13.1f} {ratio:>6.2f} "
              f"{m['plain_cpu']:>13.1f} {m['volume_cpu']:>14.1f} {cpu_ratio:>9.2f}")
        summary["workloads"][name] = {"unit": unit, **{k: round(v, 1) for k, v in m.items()},  # type: ignore[index]
                                      "ratio": round(ratio, 2), "cpu_ratio": round(cpu_ratio, 2)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
