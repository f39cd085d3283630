"""Batch de-identification of files and directories, with a per-file JSON report.

Every input file gets one report entry: ``released`` (written to OUTPUT), ``held_back`` (the
engine or the leak gate refused it, with reasons and findings) or ``error`` (not DICOM, truncated,
unreadable). A batch never stops on a bad file, and an output file appears only complete: it is
written to a temporary file in the destination directory, made durable, and only then renamed.
``run_batch`` commits in groups (:class:`GroupCommitWriter`): one ``syncfs(2)`` makes a whole group
of temporary files durable before any of them is renamed, then one fsync of the directory makes the
renames durable, instead of one fsync per file.
Output names are the pseudonymised SOP Instance UID (``<uid>.dcm``), so no source name leaks into
the export and repeated runs overwrite the same files.
"""

from __future__ import annotations

import ctypes
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pydicom
from pydicom.errors import InvalidDicomError

from compliance.deid.engine import Deidentifier
from compliance.deid.writer import encode

#: Files larger than this are refused as input (huge private blobs, runaway files).
MAX_INPUT_BYTES = 2 << 30
#: Released files made durable together by one filesystem sync (see GroupCommitWriter).
COMMIT_GROUP = 64


@dataclass
class BatchReport:
    profile: str
    project: str
    files: list[dict[str, Any]] = field(default_factory=list)

    @property
    def released(self) -> int:
        return sum(1 for f in self.files if f["status"] == "released")

    @property
    def not_released(self) -> int:
        return len(self.files) - self.released

    def as_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "project": self.project,
                "summary": {"files": len(self.files), "released": self.released,
                            "held_back": sum(1 for f in self.files if f["status"] == "held_back"),
                            "errors": sum(1 for f in self.files if f["status"] == "error")},
                "files": self.files}


def iter_inputs(inputs: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in inputs:
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        else:
            out.append(p)
    return out


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".deid-", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    return cast(Callable[[int], int], fn)


_SYNCFS = _load_syncfs()


class GroupCommitWriter:
    """Atomic, durable file writes committed in groups.

    ``write`` puts the data in a temporary file beside its target; ``commit`` makes all pending
    temporary files durable with one
    ``syncfs`` (each file fsynced where syncfs is unavailable), renames them to their targets, and
    fsyncs each target directory once. A target therefore never exists incomplete, as with
    :func:`write_atomic`; a crash before a commit leaves only ``.deid-*.part`` files behind.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[str, Path]] = []

    def write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".deid-", suffix=".part", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        except BaseException:
            os.unlink(tmp)
            raise
        self._pending.append((tmp, path))

    def commit(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            self._sync([tmp for tmp, _ in pending])
            for tmp, path in pending:
                os.replace(tmp, path)
        except BaseException:
            for tmp, _ in pending:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
            raise
        for directory in {path.parent for _, path in pending}:
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    @staticmethod
    def _sync(paths: list[str]) -> None:
        if _SYNCFS is not None:
            fd = os.open(paths[0], os.O_RDONLY)
            try:
                if _SYNCFS(fd) == 0:
                    return
            finally:
                os.close(fd)
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def abort(self) -> None:
        for tmp, _ in self._pending:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        self._pending = []


def deidentify_file(engine: Deidentifier, source: Path, output_dir: Path,
                    writer: GroupCommitWriter | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"source": str(source)}
    started = time.perf_counter()
    try:
        if source.stat().st_size > MAX_INPUT_BYTES:
            raise ValueError(f"larger than {MAX_INPUT_BYTES} bytes")
        ds = pydicom.dcmread(source)
    except InvalidDicomError:
        try:
            ds = pydicom.dcmread(source, force=True)  # DICOM without preamble/meta (PS3.10 absent)
            if len(ds) == 0 or "SOPClassUID" not in ds:
                raise InvalidDicomError("no DICOM data set")
        except Exception as exc:
            return {**entry, "status": "error", "reasons": [f"not DICOM: {type(exc).__name__}"]}
    except Exception as exc:
        return {**entry, "status": "error", "reasons": [f"unreadable: {type(exc).__name__}: {exc}"[:300]]}
    try:
        result = engine.deidentify(ds)
        if not result.released or result.dataset is None:
            return {**entry, "status": "held_back", "reasons": result.reasons, "pixels": result.pixels,
                    "findings": [f.as_dict() for f in result.findings]}
        data = encode(result.dataset)
        target = output_dir / f"{result.dataset.SOPInstanceUID}.dcm"
        if writer is None:
            write_atomic(target, data)
        else:
            writer.write(target, data)
    except Exception as exc:  # truncated pixel data, odd encodings, values that cannot be written
        return {**entry, "status": "error", "reasons": [f"could not de-identify: {type(exc).__name__}: {exc}"[:300]]}
    return {**entry, "status": "released", "output": str(target), "pixels": result.pixels,
            "notes": result.reasons, "seconds": round(time.perf_counter() - started, 4)}


def run_batch(engine: Deidentifier, inputs: list[Path], output_dir: Path) -> BatchReport:
    report = BatchReport(engine.profile.name, engine.project)
    writer = GroupCommitWriter()
    group: list[dict[str, Any]] = []
    for source in iter_inputs(inputs):
        entry = deidentify_file(engine, source, output_dir, writer)
        report.files.append(entry)
        if entry["status"] == "released":
            group.append(entry)
            if len(group) >= COMMIT_GROUP:
                _commit(writer, group)
                group = []
    _commit(writer, group)
    return report


def _commit(writer: GroupCommitWriter, entries: list[dict[str, Any]]) -> None:
    try:
        writer.commit()
    except OSError as exc:
        # The group did not become durable: its entries are reported as errors, not releases.
        for entry in entries:
            entry.update(status="error", reasons=[f"could not write the output: {exc}"[:300]])
            entry.pop("output", None)


def write_report(report: BatchReport, path: Path) -> None:
    write_atomic(path, (json.dumps(report.as_dict(), indent=2, sort_keys=True) + "\n").encode("utf-8"))
