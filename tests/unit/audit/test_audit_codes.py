"""The audit code classes match the generated table (compliance/audit/data/audit_codes_2024d.json)."""

from __future__ import annotations

import enum
import json
import re
from pathlib import Path

import pytest

from compliance.audit import _generate_codes
from compliance.audit.codes import (
    DATA_FILE,
    Action,
    AuditSourceType,
    Code,
    DataLifeCycle,
    EventID,
    EventTypeCode,
    MediaTypeCode,
    NetworkAccessPointType,
    ObjectIDTypeCode,
    ObjectRole,
    ObjectType,
    Outcome,
    RoleIDCode,
)

SCHEMA = Path(__file__).resolve().parents[4] / "shared" / "standards" / "dicom-audit-message-2024d.xsd"
TABLE = json.loads(DATA_FILE.read_text(encoding="utf-8"))


def members(cls: type) -> list[tuple[str, Code]]:
    """The codes a class names, in declaration order: ``(name, code)``."""
    if issubclass(cls, enum.Enum):
        return [(m.name, m.value) for m in cls]
    return [(name, value) for name, value in vars(cls).items() if isinstance(value, Code)]


def constant_name(meaning: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", meaning.replace("-", "")).strip("_").upper()


def table_codes(*names: str) -> list[Code]:
    return [Code(c["code"], TABLE["coded_values"][name]["scheme"], c["meaning"])
            for name in names for c in TABLE["coded_values"][name]["codes"]]


def test_table_records_edition_generator_and_sources() -> None:
    assert TABLE["edition"] == "2024d"
    assert TABLE["generator"] == "compliance/audit/_generate_codes.py"
    assert len(TABLE["schema_sha256"]) == 64
    assert all(entry["source"] for entry in TABLE["coded_values"].values())


@pytest.mark.skipif(not SCHEMA.exists(), reason="../shared not present")
def test_generator_reproduces_committed_file(tmp_path: Path) -> None:
    out = tmp_path / "codes.json"
    _generate_codes.main(["gen", str(SCHEMA), str(out)])
    assert out.read_text(encoding="utf-8") == DATA_FILE.read_text(encoding="utf-8")


@pytest.mark.parametrize(("cls", "tables"), [
    (EventID, ("CID 400",)),
    (EventTypeCode, ("CID 401",)),
    (RoleIDCode, ("CID 402",)),
    (ObjectIDTypeCode, ("RFC 3881", "CID 404")),
    (MediaTypeCode, ("CID 405",)),
])
def test_code_classes_name_every_code_of_their_table(cls: type, tables: tuple[str, ...]) -> None:
    named = members(cls)
    assert [code for _, code in named] == table_codes(*tables)
    assert [name for name, _ in named] == [constant_name(code.display) for _, code in named]


def test_audit_source_types_are_the_schema_enumeration() -> None:
    expected = [Code(e["value"], "DCM", e["meaning"]) for e in TABLE["enumerations"]["AuditSourceTypeCode"]]
    assert [code for _, code in members(AuditSourceType)] == expected


#: Enum members whose name is not the first words of the schema's meaning.
RENAMED = {("EventOutcomeIndicator", "0"): "SUCCESS"}  # "Nominal Success (use if status ...)"


@pytest.mark.parametrize(("cls", "attribute"), [
    (Action, "EventActionCode"),
    (Outcome, "EventOutcomeIndicator"),
    (NetworkAccessPointType, "NetworkAccessPointTypeCode"),
    (ObjectType, "ParticipantObjectTypeCode"),
    (ObjectRole, "ParticipantObjectTypeCodeRole"),
    (DataLifeCycle, "ParticipantObjectDataLifeCycle"),
])
def test_enumerated_attributes_match_the_schema(cls: type[enum.Enum], attribute: str) -> None:
    expected = [
        (RENAMED.get((attribute, e["value"])) or constant_name(re.split(r"[(,/]", e["meaning"])[0]), e["value"])
        for e in TABLE["enumerations"][attribute]
    ]
    assert [(m.name, str(m.value)) for m in cls] == expected


def test_codes_the_events_carry_are_unchanged() -> None:
    carried = (EventID.QUERY.value, EventTypeCode.SESSION_START, ObjectIDTypeCode.PATIENT_NUMBER,
               AuditSourceType.APPLICATION_SERVER)
    assert carried == (Code("110112", "DCM", "Query"), Code("110145", "DCM", "Session start"),
                       Code("2", "RFC-3881", "Patient Number"),
                       Code("4", "DCM", "Application Server process or thread"))
