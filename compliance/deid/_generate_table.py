"""Generate the project's copy of PS3.15 Table E.1-1 from the standard's extraction.

Run from the repository root::

    .venv/bin/python -m compliance.deid._generate_table \
        ../shared/standards/ps3.15-table-e.1-1-rev2024b.json compliance/deid/data/annex_e_2024b.json

The input is DICOM PS3.15 Table E.1-1 (Application Level Confidentiality Profile Attributes),
edition 2024b, as extracted by the innolitics/dicom-standard project (MIT licence). The output is
never edited by hand: it records the edition, the generator and the SHA-256 of its source, and
turns the table's tag patterns ("(50XX,XXXX)", "(60XX,3000)", "(GGGG,EEEE) WHERE GGGG IS ODD")
into mask/value rules. The option catalogue maps each option to its column in the table and to its
code in PS3.16 CID 7050 (De-identification Method), scheme DCM.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

from pydicom.datadict import keyword_for_tag

EDITION = "2024b"
SOURCE = "innolitics/dicom-standard standard/confidentiality_profile_attributes.json (MIT)"

#: Option name -> (table column or None, CID 7050 code, code meaning). PS3.15 E.3, PS3.16 CID 7050.
OPTIONS: dict[str, tuple[str | None, str, str]] = {
    "basic": (None, "113100", "Basic Application Confidentiality Profile"),
    "clean_pixel_data": (None, "113101", "Clean Pixel Data Option"),
    "clean_recognizable_visual_features": (None, "113102", "Clean Recognizable Visual Features Option"),
    "clean_graphics": ("cleanGraphOpt", "113103", "Clean Graphics Option"),
    "clean_structured_content": ("cleanStructContOpt", "113104", "Clean Structured Content Option"),
    "clean_descriptors": ("cleanDescOpt", "113105", "Clean Descriptors Option"),
    "retain_longitudinal_full_dates": (
        "rtnLongFullDatesOpt", "113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain_longitudinal_modified_dates": (
        "rtnLongModifDatesOpt", "113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_characteristics": ("rtnPatCharsOpt", "113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("rtnDevIdOpt", "113109", "Retain Device Identity Option"),
    "retain_uids": ("rtnUIDsOpt", "113110", "Retain UIDs Option"),
    "retain_safe_private": ("rtnSafePrivOpt", "113111", "Retain Safe Private Option"),
    "retain_institution_identity": ("rtnInstIdOpt", "113112", "Retain Institution Identity Option"),
}

_COLUMNS = {col for col, _, _ in OPTIONS.values() if col}
_PLAIN = re.compile(r"^\(([0-9A-F]{4}),([0-9A-F]{4})\)$")


def _pattern(tag: str) -> dict[str, str]:
    """Mask/value over the 32-bit tag for the table's pattern rows."""
    t = tag.upper()
    if "GGGG" in t and "ODD" in t:
        return {"mask": "0x00010000", "value": "0x00010000"}
    m = re.match(r"^\(([0-9A-FX]{4}),([0-9A-FX]{4})\)$", t)
    if not m:
        raise ValueError(f"unrecognised tag pattern {tag!r}")
    digits = m.group(1) + m.group(2)
    mask = "".join("0" if c == "X" else "F" for c in digits)
    value = "".join("0" if c == "X" else c for c in digits)
    # Repeating groups (50xx, 60xx) are even groups only: PS3.5 7.6.
    mask_i = int(mask, 16) | (0x00010000 if digits[0:2] in ("50", "60") else 0)
    return {"mask": f"0x{mask_i:08X}", "value": f"0x{int(value, 16):08X}"}


def generate(rows: list[dict[str, str]], source_sha256: str) -> dict[str, object]:
    attributes: dict[str, object] = {}
    patterns: list[object] = []
    for row in sorted(rows, key=lambda r: r["id"]):
        options = {k: v for k, v in row.items() if k in _COLUMNS}
        entry: dict[str, object] = {
            "name": row["name"],
            "basic": row["basicProfile"],
            "std_comp_iod": row["stdCompIOD"] == "Y",
            "options": options,
        }
        m = _PLAIN.match(row["tag"].upper())
        if m:
            tag = int(m.group(1) + m.group(2), 16)
            entry["keyword"] = keyword_for_tag(tag) or ""
            attributes[f"{tag:08X}"] = entry
        else:
            entry["tag"] = row["tag"]
            entry.update(_pattern(row["tag"]))
            patterns.append(entry)
    return {
        "standard": "DICOM PS3.15 Table E.1-1 Application Level Confidentiality Profile Attributes",
        "edition": EDITION,
        "source": SOURCE,
        "source_sha256": source_sha256,
        "generator": "compliance/deid/_generate_table.py",
        "options": {
            name: {"column": col, "code": code, "scheme": "DCM", "meaning": meaning}
            for name, (col, code, meaning) in OPTIONS.items()
        },
        "attributes": attributes,
        "patterns": patterns,
    }


def main(argv: list[str]) -> int:
    src, dst = Path(argv[1]), Path(argv[2])
    raw = src.read_bytes()
    rows = json.loads(raw)
    table = generate(rows, hashlib.sha256(raw).hexdigest())
    dst.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    attributes, patterns = table["attributes"], table["patterns"]
    assert isinstance(attributes, dict) and isinstance(patterns, list)
    print(f"{dst}: {len(attributes)} attributes, {len(patterns)} patterns")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
