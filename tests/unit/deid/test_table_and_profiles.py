from __future__ import annotations

import json
from pathlib import Path

import pytest

from compliance.deid import _generate_table
from compliance.deid.interfaces import DeidConfigurationError
from compliance.deid.profiles import (
    DATA_FILE,
    available_profiles,
    build_profile,
    load_profile,
    load_table,
    resolve_compound,
)

SHARED = Path(__file__).resolve().parents[4] / "shared" / "standards" / "ps3.15-table-e.1-1-rev2024b.json"


def test_table_records_edition_and_generator() -> None:
    raw = json.loads(DATA_FILE.read_text())
    assert raw["edition"] == "2024b"
    assert raw["generator"] == "compliance/deid/_generate_table.py"
    table = load_table()
    assert len(table.rows) + len(table.patterns) == 621
    assert table.rows[0x00100010].basic == "Z"
    assert {p.row.name for p in table.patterns} >= {"Curve Data", "Overlay Data", "Private Attributes"}
    assert table.options["retain_safe_private"]["code"] == "113111"
    assert table.options["basic"]["code"] == "113100"


@pytest.mark.skipif(not SHARED.exists(), reason="../shared not present")
def test_generator_reproduces_committed_file(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    _generate_table.main(["gen", str(SHARED), str(out)])
    assert json.loads(out.read_text()) == json.loads(DATA_FILE.read_text())


def test_compound_rule() -> None:
    assert resolve_compound("X/Z", std_comp_iod=False, empty=False) == "X"
    assert resolve_compound("X/Z", std_comp_iod=True, empty=False) == "Z"
    assert resolve_compound("X/D", std_comp_iod=True, empty=False) == "D"
    assert resolve_compound("X/Z/D", std_comp_iod=True, empty=True) == "Z"
    assert resolve_compound("X/Z/U*", std_comp_iod=True, empty=False) == "U"
    assert resolve_compound("K", std_comp_iod=True, empty=False) == "K"


def test_profiles_map_options_to_columns() -> None:
    assert {"basic", "research", "research-full-dates"} <= set(available_profiles())
    basic, research = load_profile("basic"), load_profile("research")
    study_date = 0x00080020
    assert basic.actions[study_date] == "Z"
    assert research.actions[study_date] == "C"
    assert load_profile("research-full-dates").actions[study_date] == "K"
    assert research.actions[0x00101010] == "K"  # Patient's Age kept with patient characteristics
    # Clean beats retain when both apply (Allergies: clean descriptors C, patient characteristics C).
    ext = load_profile("research-extended")
    assert ext.actions[0x00102110] == "C"
    assert [c for c, _ in research.method_codes] == ["113100", "113107", "113108", "113101"]


def test_bad_profiles_are_refused() -> None:
    with pytest.raises(DeidConfigurationError):
        load_profile("no-such-profile")
    with pytest.raises(DeidConfigurationError):
        build_profile("x", ["retain_uids"])
    with pytest.raises(DeidConfigurationError):
        build_profile("x", ["basic", "retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"])
