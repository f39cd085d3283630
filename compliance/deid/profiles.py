"""PS3.15 Table E.1-1 as data, and the site profiles that apply it.

The table is the project's own generated copy (``data/annex_e_<edition>.json``, see
``_generate_table.py``); profiles, the safe-private list and the pixel rules are site policy in
``policies/deid/`` (override the directory with ``COMPLIANCE_DEID_POLICIES``).

Resolving one row for a profile (PS3.15 E.3):

1. The options of the profile that have a column for the row replace the Basic Profile action.
   When several do (Allergies: Clean Descriptors C and Retain Patient Characteristics C; Device UID:
   Retain Device Identity K and Retain UIDs K), the strictest of them wins, in the order
   X > Z > D > U > C > K: a retain option never undoes a clean option.
2. A compound action (X/Z, X/D, X/Z/D, Z/D, X/Z/U*) is resolved per element by ``resolve_compound``:
   the strictest action that keeps the dataset valid without per-IOD module knowledge. Attributes
   that are in no standard composite IOD (``stdCompIOD`` N) are removed (X). Otherwise an element
   that is already empty stays empty (Z: it was valid empty); a non-empty one gets Z for X/Z (it can
   be Type 2 at most), and the dummy D for X/D, X/Z/D and Z/D (it can be Type 1), U for X/Z/U*.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydicom.datadict import tag_for_keyword

from compliance.deid.interfaces import DeidConfigurationError

DATA_FILE = Path(__file__).with_name("data") / "annex_e_2024b.json"
_STRICTNESS = {"X": 6, "Z": 5, "D": 4, "U": 3, "C": 2, "K": 1}
_COMPOUND = {"X/Z", "X/D", "X/Z/D", "Z/D", "X/Z/U*"}


def policies_dir() -> Path:
    env = os.environ.get("COMPLIANCE_DEID_POLICIES")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "policies" / "deid"


@dataclass(frozen=True)
class Row:
    name: str
    basic: str
    std_comp_iod: bool
    options: dict[str, str]


@dataclass(frozen=True)
class Pattern:
    row: Row
    mask: int
    value: int


@dataclass(frozen=True)
class ActionTable:
    edition: str
    rows: dict[int, Row]
    patterns: tuple[Pattern, ...]
    options: dict[str, dict[str, Any]]


@cache
def load_table(path: Path = DATA_FILE) -> ActionTable:
    raw = json.loads(path.read_text(encoding="utf-8"))

    def row(e: dict[str, Any]) -> Row:
        return Row(e["name"], e["basic"], e["std_comp_iod"], dict(e["options"]))

    rows = {int(k, 16): row(v) for k, v in raw["attributes"].items()}
    patterns = tuple(Pattern(row(p), int(p["mask"], 16), int(p["value"], 16)) for p in raw["patterns"])
    return ActionTable(raw["edition"], rows, patterns, raw["options"])


def resolve_row(row: Row, columns: frozenset[str]) -> str:
    """The action for one row under the option columns in effect (rule 1 above)."""
    chosen = [a for c, a in row.options.items() if c in columns]
    if not chosen:
        return row.basic
    return max(chosen, key=lambda a: _STRICTNESS.get(a, 7))


def resolve_compound(action: str, std_comp_iod: bool, empty: bool) -> str:
    """Rule 2 above. Plain actions are returned unchanged."""
    if action not in _COMPOUND:
        return action
    if not std_comp_iod:
        return "X"
    if empty:
        return "Z"
    if action == "X/Z":
        return "Z"
    if action == "X/Z/U*":
        return "U"
    return "D"


@dataclass(frozen=True)
class SafePrivate:
    creator: str
    group: int
    element: int  # low byte


@dataclass(frozen=True)
class Profile:
    """A named site profile: the Basic Profile plus options, and what it keeps beyond the table."""

    name: str
    options: tuple[str, ...]
    table: ActionTable
    keep: frozenset[int] = frozenset()
    safe_private: frozenset[SafePrivate] = frozenset()
    ocr: bool = False
    description: str = ""
    actions: dict[int, str] = field(default_factory=dict, compare=False, repr=False)
    pattern_actions: tuple[tuple[int, int, str, bool], ...] = field(default=(), compare=False, repr=False)

    def has(self, option: str) -> bool:
        return option in self.options

    @property
    def method_codes(self) -> list[tuple[str, str]]:
        """(code, meaning) for De-identification Method Code Sequence, PS3.16 CID 7050."""
        return [(self.table.options[o]["code"], self.table.options[o]["meaning"]) for o in self.options]


def build_profile(name: str, options: list[str] | tuple[str, ...], *, keep: list[str] | tuple[str, ...] = (),
                  safe_private: frozenset[SafePrivate] | None = None, ocr: bool = False,
                  description: str = "", table: ActionTable | None = None) -> Profile:
    table = table or load_table()
    opts = tuple(dict.fromkeys(options))
    unknown = [o for o in opts if o not in table.options]
    if unknown:
        raise DeidConfigurationError(f"profile {name!r}: unknown options {unknown}")
    if "basic" not in opts:
        raise DeidConfigurationError(f"profile {name!r}: every profile starts from 'basic'")
    if {"retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"} <= set(opts):
        raise DeidConfigurationError(f"profile {name!r}: full and modified dates are exclusive")
    if "clean_recognizable_visual_features" in opts:
        raise DeidConfigurationError("clean_recognizable_visual_features is not implemented by this engine")
    columns = frozenset(c for o in opts if (c := table.options[o]["column"]))
    actions = {tag: resolve_row(row, columns) for tag, row in table.rows.items()}
    pattern_actions = tuple((p.mask, p.value, resolve_row(p.row, columns), p.row.std_comp_iod)
                            for p in table.patterns)
    keep_tags: set[int] = set()
    for k in keep:
        tag = tag_for_keyword(k) if not _is_hex(k) else int(k, 16)
        if tag is None:
            raise DeidConfigurationError(f"profile {name!r}: unknown keep entry {k!r}")
        keep_tags.add(tag)
    if safe_private is None:
        safe_private = load_safe_private() if "retain_safe_private" in opts else frozenset()
    return Profile(name, opts, table, frozenset(keep_tags), safe_private, ocr, description,
                   actions, pattern_actions)


def _is_hex(s: str) -> bool:
    return len(s) == 8 and all(c in "0123456789abcdefABCDEF" for c in s)


def load_safe_private(directory: Path | None = None) -> frozenset[SafePrivate]:
    path = (directory or policies_dir()) / "safe-private.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return frozenset(SafePrivate(e["creator"].strip(), int(e["group"], 16), int(e["element"], 16))
                     for e in data.get("safe_private", []))


def load_profile(name: str, directory: Path | None = None) -> Profile:
    directory = directory or policies_dir()
    path = directory / f"{name}.yaml"
    if not path.is_file() or "/" in name or name.startswith("."):
        raise DeidConfigurationError(f"no de-identification profile {name!r} in {directory}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    safe = load_safe_private(directory) if "retain_safe_private" in data.get("options", []) else frozenset()
    return build_profile(data.get("name", name), data.get("options", []), keep=data.get("keep") or (),
                         safe_private=safe, ocr=bool(data.get("ocr", False)),
                         description=data.get("description", ""))


def available_profiles(directory: Path | None = None) -> list[str]:
    d = directory or policies_dir()
    return sorted(p.stem for p in d.glob("*.yaml") if p.stem not in {"safe-private", "pixel-risk"})
