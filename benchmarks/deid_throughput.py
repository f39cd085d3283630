"""De-identification throughput: this engine against deid's replace_identifiers (default recipe).

    .venv/bin/python benchmarks/deid_throughput.py [--copies 1000] [--profile basic] [--chunks 5]

Same run, same files (N copies of pydicom's bundled CT instance ``CT_small.dcm``), one process;
both read every file from disk and write the de-identified file. The files are processed in
``--chunks`` consecutive slices, each slice by both (alternating which goes first), and each side's
time is the sum over the slices: on a machine shared with other work, both sides then see the same
load, instead of the engine's few seconds and deid's minute or more falling into different moments.
The ratio is also given on the CPU time of the process (``process_time``), which other work on a
shared machine disturbs far less than wall time; it leaves out time spent waiting, such as the
engine's durable writes (deid writes without fsync).
Then the engine again with two worker processes. Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from pydicom.data import get_testdata_file


def _engine(profile: str):  # type: ignore[no-untyped-def]
    from compliance.deid.engine import Deidentifier
    from compliance.deid.interfaces import StaticPseudonymSecretSource
    from compliance.deid.profiles import load_profile

    return Deidentifier(load_profile(profile), "bench", StaticPseudonymSecretSource({"bench": b"b" * 32}))


def run_engine(files: list[Path], out: Path, profile: str) -> int:
    from compliance.deid.batch import run_batch

    engine = _engine(profile)
    return run_batch(engine, files, out).released


def _worker(args: tuple[list[Path], Path, str]) -> int:
    return run_engine(*args)


def run_deid(files: list[Path], out: Path) -> None:
    from deid.dicom import replace_identifiers

    out.mkdir(parents=True, exist_ok=True)
    replace_identifiers(dicom_files=[str(f) for f in files], save=True, output_folder=str(out), overwrite=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=1000)
    ap.add_argument("--profile", default="basic")
    ap.add_argument("--chunks", type=int, default=5, help="interleave engine and deid over this many slices")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    from deid.logger import bot

    bot.level = 0

    src = Path(get_testdata_file("CT_small.dcm"))
    with tempfile.TemporaryDirectory(prefix="deid-bench-") as tmp:
        root = Path(tmp)
        inp = root / "in"
        inp.mkdir()
        files = []
        for i in range(args.copies):
            f = inp / f"ct{i:05d}.dcm"
            shutil.copyfile(src, f)
            files.append(f)
        run_engine(files[:5], root / "warm", args.profile)  # import and cache warm-up, not timed

        t_engine = t_deid = cpu_engine = cpu_deid = 0.0
        released = 0
        size = -(-len(files) // max(1, args.chunks))
        for n, start in enumerate(range(0, len(files), size)):
            part = files[start:start + size]
            for side in (("engine", "deid") if n % 2 == 0 else ("deid", "engine")):
                t0, c0 = time.perf_counter(), time.process_time()
                if side == "engine":
                    released += run_engine(part, root / "engine1", args.profile)
                    t_engine += time.perf_counter() - t0
                    cpu_engine += time.process_time() - c0
                else:
                    run_deid(part, root / "deid")
                    t_deid += time.perf_counter() - t0
                    cpu_deid += time.process_time() - c0

        half = len(files) // 2
        t0 = time.perf_counter()
        with mp.get_context("spawn").Pool(2) as pool:
            released2 = sum(pool.map(_worker, [(files[:half], root / "engine2", args.profile),
                                               (files[half:], root / "engine2", args.profile)]))
        t_engine2 = time.perf_counter() - t0

    n = len(files)
    res = {
        "copies": n,
        "profile": args.profile,
        "chunks": args.chunks,
        "engine_instances_per_s": round(n / t_engine, 1),
        "deid_replace_identifiers_instances_per_s": round(n / t_deid, 1),
        "ratio_engine_over_deid": round(t_deid / t_engine, 1),
        # CPU seconds of this process per side: what other work on a shared machine disturbs least
        # (it leaves out waiting, e.g. the engine's durable writes, which deid does not make)
        "ratio_cpu_time": round(cpu_deid / cpu_engine, 1),
        "engine_2proc_instances_per_s": round(n / t_engine2, 1),
        "speedup_2proc": round(t_engine / t_engine2, 2),
        "released": released,
        "released_2proc": released2,
    }
    print(f"engine ({args.profile}), 1 process : {res['engine_instances_per_s']:>8} instances/s")
    print(f"deid replace_identifiers (default): {res['deid_replace_identifiers_instances_per_s']:>8} instances/s")
    print(f"ratio engine / deid               : {res['ratio_engine_over_deid']:>8}x"
          f" (CPU time of this process: {res['ratio_cpu_time']}x)")
    print(f"engine, 2 processes               : {res['engine_2proc_instances_per_s']:>8} instances/s"
          f" (speed-up {res['speedup_2proc']}x; spawn start-up included)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
