"""The leak gate: no identifying value of the source may appear anywhere in the output.

While the engine walks a source dataset it tells the ``IdentifierCollector`` every value it removes
or replaces, and every value it keeps. Identifiers are of two strengths:

- hard: person names (whole and each component of 3+ characters, every component group), IDs and
  numbers (attributes whose keyword ends in ID/IDs/Number/Numbers), non-registry UIDs, dates
  (YYYYMMDD). A hard identifier found in the output always blocks.
- soft: free-text tokens (4+ characters with a letter, not in the stoplist) of removed text.
  A token that also occurs in a value the profile keeps is dropped: it is not identifying by itself.

``scan`` renders every element of the output (file meta, nested sequences, private tags; bytes
values are decoded as UTF-8, Latin-1 and the dataset's character set) and looks for the identifiers
with one compiled expression, bounded so that an identifier never matches inside a longer word or
number (a date is not found inside a 2.25 UID). Findings never carry the identifying value: only
the element path, the kind and a short hash.
"""

from __future__ import annotations

import hashlib
import re
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from compliance.deid.pseudonyms import is_standard_uid

TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM",
                      "UC", "UI", "UR", "UT"})
BYTES_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
MAX_SCANNED_BYTES = 1 << 20
_TOKEN = re.compile(r"[^\W_]+", re.UNICODE)
_ID_SUFFIXES = ("ID", "IDS", "NUMBER", "NUMBERS")
STOPLIST = frozenset([
    "THE", "AND", "FOR", "WITH", "FROM", "THIS", "THAT", "NONE", "NULL", "UNKNOWN", "LEFT", "RIGHT",
    "BOTH", "HEAD", "NECK", "CHEST", "ABDOMEN", "PELVIS", "BRAIN", "SPINE", "KNEE", "HAND", "FOOT",
    "BODY", "WHOLE", "AXIAL", "CORONAL", "SAGITTAL", "ORIGINAL", "PRIMARY", "SECONDARY", "DERIVED",
    "IMAGE", "IMAGES", "SERIES", "STUDY", "SCAN", "SCOUT", "LOCALIZER", "CONTRAST", "WITHOUT",
    "ROUTINE", "PROTOCOL", "REPORT", "PATIENT", "PHYSICIAN", "DOCTOR", "HOSPITAL", "CLINIC", "MEDICAL",
    "CENTER", "CENTRE", "DEPARTMENT", "RADIOLOGY", "IMAGING", "NORMAL",
])


@dataclass(frozen=True)
class Finding:
    path: str
    kind: str
    digest: str  # sha256 prefix of the identifying value: lets a steward match without exposing it

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "kind": self.kind, "value_sha256": self.digest}


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:16]


class IdentifierCollector:
    def __init__(self) -> None:
        self.hard: dict[str, str] = {}
        self._soft: set[str] = set()
        self._kept_tokens: set[str] = set()
        # Tokenised together when first needed (one regular-expression pass instead of one per value;
        # a token never spans the newline that joins them, so the tokens are the same).
        self._pending_bytes: list[bytes] = []
        self._pending_kept: list[str] = []

    @property
    def soft(self) -> set[str]:
        if self._pending_bytes:
            text = b"\n".join(self._pending_bytes).decode("latin-1").upper()
            self._pending_bytes = []
            self._soft.update(t for t in _TOKEN.findall(text) if _soft_token(t) and t.isascii())
        return self._soft

    @property
    def kept_tokens(self) -> set[str]:
        if self._pending_kept:
            text = "\n".join(self._pending_kept).upper()
            self._pending_kept = []
            self._kept_tokens.update(_TOKEN.findall(text))
        return self._kept_tokens

    # -- collection ---------------------------------------------------------------------------
    def removed(self, vr: str, keyword: str, value: object) -> None:
        for v in _strings(value):
            v = v.strip().upper()
            if not v:
                continue
            if vr == "PN":
                self._name(v)
            elif vr == "UI":
                if not is_standard_uid(v) and len(v) >= 4:
                    self.hard[v] = "uid"
            elif vr in ("DA", "DT"):
                if len(v) >= 8 and v[:8].isdigit():
                    self.hard[v[:8]] = "date"
            elif vr in ("TM", "DS", "IS", "AS", "CS") or vr in BYTES_VRS:
                continue
            elif keyword.upper().endswith(_ID_SUFFIXES) and len(v) >= 3:
                self.hard[v] = "id"
            else:
                self._soft.update(t for t in _TOKEN.findall(v) if _soft_token(t))

    def removed_bytes(self, value: bytes) -> None:
        """Removed private/unknown binary: its printable text runs are soft tokens."""
        if len(value) <= 4096:
            self._pending_bytes.append(value)

    def kept(self, value: object) -> None:
        self._pending_kept.extend(_strings(value))

    def _name(self, v: str) -> None:
        self.hard[v] = "name"
        for group in v.split("="):
            for part in re.split(r"[\^\s,]+", group):
                if len(part) >= 3 or (part and not part.isascii() and len(part) >= 2):
                    self.hard[part] = "name"

    # -- matching -----------------------------------------------------------------------------
    def identifiers(self) -> dict[str, str]:
        ids = {t: "token" for t in self.soft - self.kept_tokens - STOPLIST}
        ids.update(self.hard)
        return ids

    def scrub_pattern(self) -> re.Pattern[str] | None:
        return _compile(self.hard)


def _soft_token(t: str) -> bool:
    # Numbers alone are not soft identifiers (IDs are hard, by keyword): too many kept values share them.
    return len(t) >= 4 and not t.isdigit() and any(c.isalpha() for c in t)


def _strings(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(x) for x in cast(Iterable[object], value) if x is not None]
    if isinstance(value, (bytes, bytearray)):
        return []
    return [str(value)]


def _compile(ids: dict[str, str]) -> re.Pattern[str] | None:
    if not ids:
        return None
    alts = "|".join(re.escape(i) for i in sorted(ids, key=len, reverse=True))
    return re.compile(r"(?<![A-Z0-9_])(?:" + alts + r")(?![A-Z0-9_])")


def _path(prefix: str, t: int) -> str:
    return f"{prefix}({t >> 16:04X},{t & 0xFFFF:04X})"


def scan(dataset: Dataset, collector: IdentifierCollector) -> list[Finding]:
    """Every element of ``dataset`` (and its file meta) against the collected identifiers."""
    ids = collector.identifiers()
    if not ids:
        return []
    encodings = ["utf-8", "latin-1"]
    try:
        encodings += [e for e in convert_encodings(dataset.get("SpecificCharacterSet") or "ISO_IR 6")
                      if e not in encodings]
    except Exception:  # noqa: S110 - an unknown charset only narrows what bytes we decode
        pass
    parts: list[str] = []
    starts: list[int] = []
    #: (prefix, tag) per part; the element path is only spelled out for a finding
    paths: list[tuple[str, int]] = []
    pos = 0

    def add(prefix: str, t: int, text: str) -> None:
        nonlocal pos
        starts.append(pos)
        paths.append((prefix, t))
        parts.append(text)
        pos += len(text) + 1

    def walk(ds: Dataset, prefix: str) -> None:
        elements = ds._dict
        for tag in ds.keys():
            elem = elements.get(tag)
            if type(elem) is RawDataElement and elem.value is None:
                elem = ds.get_item(tag)  # a deferred value is read (and converted)
            if elem is None:
                continue
            t = int(tag)
            if not isinstance(elem, DataElement):  # raw, undecoded: scan its bytes
                if elem.VR == "SQ" or elem.length == 0xFFFFFFFF or (elem.VR is None and t >> 16 & 1):
                    elem = ds[tag]
                elif t != 0x7FE00010 and elem.value:
                    raw = bytes(elem.value[:MAX_SCANNED_BYTES])
                    for enc in encodings[2:] if elem.VR in TEXT_VRS and len(encodings) > 2 else encodings:
                        add(prefix, t, raw.decode(enc, errors="ignore").upper())
                    continue
                else:
                    continue
            vr = elem.VR
            if vr == "SQ":
                for i, item in enumerate(elem.value or []):
                    walk(item, f"{_path(prefix, t)}[{i}].")
            elif vr in BYTES_VRS or isinstance(elem.value, (bytes, bytearray)):
                if t == 0x7FE00010 or not elem.value:
                    continue
                raw = bytes(elem.value[:MAX_SCANNED_BYTES])
                for enc in encodings:
                    try:
                        add(prefix, t, raw.decode(enc, errors="ignore").upper())
                    except LookupError:
                        continue
            elif elem.value is not None and elem.value != "":
                v = elem.value
                if isinstance(v, PersonName):
                    add(prefix, t, str(v).upper())
                else:
                    add(prefix, t, "\\".join(_strings(v)).upper())

    meta = getattr(dataset, "file_meta", None)
    if meta is not None:
        walk(meta, "meta:")
    walk(dataset, "")
    blob = "\n".join(parts)
    # Only identifiers that occur in the text at all can match; compiling the expression over those
    # alone finds exactly the same matches (an absent alternative never matches anywhere) and spares
    # compiling one over every identifier of the source, a new expression for every file.
    pattern = _compile({i: k for i, k in ids.items() if i in blob})
    if pattern is None:
        return []
    findings: list[Finding] = []
    seen: set[tuple[str, str]] = set()
    for m in pattern.finditer(blob):
        path = _path(*paths[bisect_right(starts, m.start()) - 1])
        value = m.group(0)
        if (path, value) in seen:
            continue
        seen.add((path, value))
        findings.append(Finding(path, ids.get(value, "token"), _digest(value)))
    return findings
