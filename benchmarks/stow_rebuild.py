"""What rebuilding a STOW-RS body costs the gateway (issue 12 item 1), in-process, no network.

The gateway now validates each part's element framing as it streams (compliance/dicomweb/
dicom_structure.py) and sends the archive a body it rebuilds from the validated parts, instead of
forwarding the client's bytes. This times, on the same body and in the same run:

* ``copy``: joining the body's chunks into one buffer (a memcpy: the floor of any forwarding);
* ``parse``: python-multipart alone over the body, callbacks doing nothing (the framing parse);
* ``old``: the validator before this change (forwarded the client's bytes), loaded from git
  (``--baseline-rev``), when the repository has it;
* ``new``: ``StowStreamValidator`` as the gateway runs it: parse, walk, pydicom header check, rebuild.

Each is fed the body in 64 KiB chunks (what uvicorn hands the app) and timed in CPU seconds
(``time.process_time``) per request; the median of ``--rounds`` is reported, with the ratios.

    .venv/bin/python benchmarks/stow_rebuild.py --instances 20 --rounds 15
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from python_multipart.multipart import MultipartParser  # noqa: E402

from compliance.demo import synthetic_instance  # noqa: E402
from compliance.dicomweb.stow import StowStreamValidator, multipart_related  # noqa: E402

CHUNK = 64 * 1024


def chunks_of(body: bytes) -> list[bytes]:
    return [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]


def old_validator(rev: str) -> type | None:
    """The StowStreamValidator of ``rev`` (before the rebuild), or None when git cannot give it."""
    try:
        source = subprocess.run(["git", "show", f"{rev}:compliance/dicomweb/stow.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    if "dicom_structure" in source:
        return None  # not a version before the rebuild
    path = Path(tempfile.mkdtemp()) / "stow_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("stow_old", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["stow_old"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.StowStreamValidator  # type: ignore[no-any-return]


def timed(run: Callable[[], int], rounds: int) -> tuple[float, int]:
    """Median CPU seconds of ``run`` over ``rounds`` (after one warm-up), and its output size."""
    size = run()
    samples = []
    for _ in range(rounds):
        started = time.process_time()
        run()
        samples.append(time.process_time() - started)
    return statistics.median(samples), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--frames", type=int, default=1, help="0.5 MiB frames per instance")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--baseline-rev", default="4326dcf", help="a git revision with the old validator")
    args = parser.parse_args()

    instances = [synthetic_instance(frames=args.frames, patient_id=f"BENCH-{i:04d}")[0] for i in range(args.instances)]
    body, content_type = multipart_related(instances)
    chunks = chunks_of(body)
    boundary = content_type.rsplit("boundary=", 1)[1].encode()

    def copy() -> int:
        return len(b"".join(chunks))

    def parse() -> int:
        p = MultipartParser(boundary, {})
        for c in chunks:
            p.write(c)
        return len(body)

    def validate_with(cls: type) -> Callable[[], int]:
        def run() -> int:
            v = cls(content_type)
            out = [v.feed(c) for c in chunks]
            out.append(v.finish())
            return len(b"".join(out))
        return run

    runs: dict[str, Callable[[], int]] = {"copy": copy, "parse": parse}
    old = old_validator(args.baseline_rev)
    if old is not None:
        runs["old"] = validate_with(old)
    runs["new"] = validate_with(StowStreamValidator)

    mib = len(body) / 2**20
    print(f"body: {args.instances} instances, {mib:.1f} MiB, {len(chunks)} chunks of 64 KiB; "
          f"median of {args.rounds} rounds, CPU time per request")
    results = {}
    for name, run in runs.items():
        seconds, size = timed(run, args.rounds)
        results[name] = seconds
        print(f"  {name:6s} {seconds * 1000:8.2f} ms   {mib / seconds:8.0f} MiB/s   out {size} bytes")
    new = results["new"]
    print(f"new / copy  = {new / results['copy']:.1f}x")
    print(f"new / parse = {new / results['parse']:.2f}x")
    if "old" in results:
        print(f"new / old   = {new / results['old']:.2f}x  (+{(new - results['old']) * 1000:.2f} ms CPU per request, "
              f"+{(new - results['old']) * 1000 / args.instances:.3f} ms per instance)")
    else:
        print(f"(no old validator at {args.baseline_rev}: pass --baseline-rev)")


if __name__ == "__main__":
    main()
