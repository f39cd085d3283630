"""Burned-in text: which instances are at risk, and cleaning them by region rules.

Risk is decided from the source header by ``policies/deid/pixel-risk.yaml`` (BurnedInAnnotation
YES; secondary capture, ultrasound, projection X-ray). Region rules are kept in deid's recipe
format (``policies/deid/pixels.deid``) and evaluated with deid's own filter engine
(``deid.dicom.pixels.detect.has_burned_pixels``); the engine then blanks the regions itself with
numpy and stores the pixels uncompressed (deid's ``DicomCleaner`` works file to file through
matplotlib and would re-read every instance; here the dataset is already in memory).

An optional second gate runs tesseract (Debian ``tesseract-ocr``) over the cleaned pixels; if it is
asked for and not installed, the instance is held back (fail closed).
"""

from __future__ import annotations

import copy
import logging
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deid.config import DeidRecipe

import numpy as np
import yaml
from pydicom.dataset import Dataset, FileDataset
from pydicom.uid import ExplicitVRLittleEndian

from compliance.deid.profiles import policies_dir
from compliance.deid.rawvalues import peek

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RiskKind:
    name: str
    trust_no: bool
    sop_classes: frozenset[str]
    modalities: frozenset[str]


@dataclass(frozen=True)
class PixelPolicy:
    burned_in_yes: bool
    kinds: tuple[RiskKind, ...]
    recipe_path: Path

    def at_risk(self, ds: Dataset) -> str | None:
        """The reason this instance may carry burned-in text, or None."""
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            return None
        bia = str(peek(ds, "BurnedInAnnotation", "") or "").strip().upper()
        if self.burned_in_yes and bia == "YES":
            return "BurnedInAnnotation is YES"
        sop = str(peek(ds, "SOPClassUID", "") or "")
        modality = str(peek(ds, "Modality", "") or "").upper()
        for kind in self.kinds:
            if sop in kind.sop_classes or modality in kind.modalities:
                if bia == "NO" and kind.trust_no:
                    return None
                return f"{kind.name} commonly carries burned-in text"
        return None


@cache
def load_pixel_policy(directory: Path | None = None) -> PixelPolicy:
    d = directory or policies_dir()
    data = yaml.safe_load((d / "pixel-risk.yaml").read_text(encoding="utf-8")) or {}
    kinds = tuple(RiskKind(k["name"], bool(k.get("trust_no", False)),
                           frozenset(k.get("sop_classes", [])), frozenset(k.get("modalities", [])))
                  for k in data.get("kinds", []))
    return PixelPolicy(bool(data.get("burned_in_annotation_yes", True)), kinds, d / "pixels.deid")


@cache
def _recipe(path: Path) -> DeidRecipe:
    from deid.config import DeidRecipe

    return DeidRecipe(str(path))


def matching_regions(source: Dataset, policy: PixelPolicy) -> list[dict[str, Any]]:
    """deid's verdict for the source header: the matched labels with their coordinates."""
    from deid.dicom.pixels.detect import has_burned_pixels

    # deid rewrites "from:" coordinates inside the recipe it is given: use a fresh copy each time.
    recipe = copy.deepcopy(_recipe(policy.recipe_path))
    if not isinstance(source, FileDataset):
        fds = FileDataset("", source, file_meta=getattr(source, "file_meta", None), preamble=b"\0" * 128)
    else:
        fds = source
    result = has_burned_pixels(fds, force=True, deid=recipe)
    return [r for r in result.get("results", []) if r.get("coordinates")]


def _boxes(spec: Any, cols: int, rows: int) -> list[tuple[int, int, int, int]]:
    items = spec if isinstance(spec, list) else [spec]
    boxes = []
    for item in items:
        s = str(item).strip()
        if s == "all":
            boxes.append((0, 0, cols, rows))
            continue
        x0, y0, x1, y1 = (int(float(p)) for p in s.split(","))
        boxes.append((max(0, x0), max(0, y0), min(cols, x1), min(rows, y1)))
    return boxes


def clean_regions(ds: Dataset, matches: list[dict[str, Any]]) -> list[str]:
    """Blank the matched regions in ``ds`` (in place). Returns the labels applied."""
    arr = ds.pixel_array
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    view = arr.reshape((frames, rows, cols, samples)).copy()
    keep = np.zeros((rows, cols), dtype=bool)
    have_keep = False
    applied = []
    for match in matches:
        for mask_flag, spec in match["coordinates"]:
            boxes = _boxes(spec, cols, rows)
            if int(mask_flag) == 1:
                have_keep = True
                for x0, y0, x1, y1 in boxes:
                    keep[y0:y1, x0:x1] = True
            else:
                for x0, y0, x1, y1 in boxes:
                    view[:, y0:y1, x0:x1, :] = 0
        applied.append(str(match.get("reason", "")).strip() or "rule")
    if have_keep:
        view[:, ~keep, :] = 0
    out = view.reshape(arr.shape)
    photometric = str(ds.PhotometricInterpretation)
    if samples == 3 and photometric.startswith("YBR"):
        photometric = "RGB"  # pixel_array converted YBR to RGB
    # Keep the (pseudonymised) SOP Instance UID: pydicom would otherwise mint a random one, breaking
    # repeatable pseudonyms and every reference to this instance.
    ds.set_pixel_data(out, photometric, int(ds.BitsStored), generate_instance_uid=False)
    if hasattr(ds, "file_meta"):
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return applied


def ocr_text(ds: Dataset, max_frames: int = 3) -> str | None:
    """Text tesseract reads in the (cleaned) pixels; None when tesseract is not installed."""
    exe = shutil.which("tesseract")
    if exe is None:
        return None
    from PIL import Image

    arr = ds.pixel_array
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    arr = arr.reshape((frames, rows, cols, samples))
    texts = []
    for f in range(min(frames, max_frames)):
        img = arr[f, :, :, 0] if samples == 1 else arr[f]
        img = img.astype(np.float64)
        span = float(img.max() - img.min()) or 1.0
        img8 = ((img - img.min()) * 255.0 / span).astype(np.uint8)
        buf = BytesIO()
        Image.fromarray(img8).save(buf, format="PNG")
        proc = subprocess.run([exe, "stdin", "stdout"], input=buf.getvalue(), capture_output=True,
                              timeout=120, check=False)
        texts.append(proc.stdout.decode("utf-8", errors="replace"))
    return "\n".join(texts)
