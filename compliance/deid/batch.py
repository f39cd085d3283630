"""Batch de-identification of files and directories, with a per-file JSON report.

Every input file gets one report entry: ``released`` (written to OUTPUT), ``held_back`` (the
engine or the leak gate refused it, with reasons and findings) or ``error`` (not DICOM, truncated,
unreadable). A batch never stops on a bad file, and an output file appears only complete: it is
written to a temporary file in the destination directory, flushed, fsynced and renamed.
Output names are the pseudonymised SOP Instance UID (``<uid>.dcm``), so no source name leaks into
the export and repeated runs overwrite the same files.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from compliance.deid.engine import Deidentifier

#: Files larger than this are refused as input (huge private blobs, runaway files).
MAX_INPUT_BYTES = 2 << 30


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


def deidentify_file(engine: Deidentifier, source: Path, output_dir: Path) -> dict[str, Any]:
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
        buf = BytesIO()
        result.dataset.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
        target = output_dir / f"{result.dataset.SOPInstanceUID}.dcm"
        write_atomic(target, data)
    except Exception as exc:  # truncated pixel data, odd encodings, values that cannot be written
        return {**entry, "status": "error", "reasons": [f"could not de-identify: {type(exc).__name__}: {exc}"[:300]]}
    return {**entry, "status": "released", "output": str(target), "pixels": result.pixels,
            "notes": result.reasons, "seconds": round(time.perf_counter() - started, 4)}


def run_batch(engine: Deidentifier, inputs: list[Path], output_dir: Path) -> BatchReport:
    report = BatchReport(engine.profile.name, engine.project)
    for source in iter_inputs(inputs):
        report.files.append(deidentify_file(engine, source, output_dir))
    return report


def write_report(report: BatchReport, path: Path) -> None:
    write_atomic(path, (json.dumps(report.as_dict(), indent=2, sort_keys=True) + "\n").encode("utf-8"))
