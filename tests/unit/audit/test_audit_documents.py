"""The Elasticsearch document of each builder, the monthly index name, and the template's coverage."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from lxml import etree
from test_audit_atna import ALL, CT, MR, SOURCE, STUDY

from compliance.audit.atna import validate_atna_xml
from compliance.audit.documents import event_indices, index_name, to_document
from compliance.audit.elasticsearch import TEMPLATE_PATH, load_template


def doc(name: str) -> dict:
    return to_document(ALL[name], SOURCE)  # type: ignore[arg-type]


def test_index_name_by_month() -> None:
    assert index_name("audit", datetime(2024, 3, 31, 23, 59, tzinfo=UTC)) == "audit-2024.03"
    assert index_name("audit", datetime(2024, 4, 1, 0, 0, tzinfo=UTC)) == "audit-2024.04"
    # The UTC month decides, not the local one.
    local = datetime(2024, 4, 1, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    assert index_name("audit", local) == "audit-2024.03"
    with pytest.raises(ValueError):
        index_name("audit", datetime(2024, 4, 1))


def test_query_document() -> None:
    d = doc("query")
    assert d["event.id"] == "110112"
    assert d["event.name"] == "Query"
    assert d["event.action"] == "E"
    assert d["event.outcome"] == 0
    assert d["@timestamp"] == "2024-03-31T23:59:59.123Z"
    assert d["event.uuid"] == ALL["query"].uuid  # type: ignore[attr-defined]
    assert d["user.id"] == "3f1c-sub"
    assert d["user.name"] == "alice"
    assert sorted(d["user.roles"]) == ["clinician", "radiologist"]
    assert d["client.id"] == "ohif-viewer"
    assert d["source.address"] == "10.1.2.3"
    assert d["patient.ids"] == ["PAT-001"]
    assert d["patient.names"] == ["Yamada^Tarou=山田^太郎"]
    assert d["sop_class.uids"] == ["1.2.840.10008.5.1.4.1.2.2.1"]
    assert d["audit_source.id"] == "compliance-gateway"
    validate_atna_xml(d["atna.xml"].encode("utf-8"))


def test_accessed_document() -> None:
    d = doc("accessed")
    assert (d["event.id"], d["event.action"]) == ("110103", "R")
    assert d["event.type_codes"] == ["110127"]
    assert d["study.uids"] == [STUDY.study_uid]
    assert sorted(d["sop_class.uids"]) == sorted([CT, MR])
    assert d["instance_count"] == 123
    assert d["purpose_of_use"] == ["ETREAT"]


def test_transferred_import_deleted_documents() -> None:
    assert doc("transferred")["event.id"] == "110104"
    assert "orthanc-archive" in doc("transferred")["participant.ids"]
    assert (doc("import")["event.id"], doc("import")["event.action"]) == ("110107", "C")
    deleted = doc("deleted")
    assert (deleted["event.id"], deleted["event.action"]) == ("110105", "D")
    assert deleted["patient.ids"] == ["PAT-001"]


def test_export_document() -> None:
    d = doc("export")
    assert d["event.id"] == "110106"
    assert d["recipient"] == "mailto:researcher@univ.example"
    assert d["purpose_of_use"] == ["HRESCH"]
    assert d["patient.ids"] == ["PAT-001", "PAT-002"]
    assert d["user.id"] == "3f1c-sub"


def test_security_alert_documents() -> None:
    unknown = doc("alert_unknown")
    assert unknown["event.id"] == "110113"
    assert unknown["user.id"] is None
    assert unknown["user.unverified_claim"] == "mallory\x01"
    assert unknown["source.address"] == "203.0.113.9"
    assert unknown["event.outcome"] == 4
    denied = doc("alert_denied")
    assert denied["user.id"] == "3f1c-sub"  # the performer, though not the requestor
    assert denied["event.type_codes"] == ["110147"]
    assert denied["study.uids"] == [STUDY.study_uid]


def test_other_documents() -> None:
    assert doc("login")["event.type_codes"] == ["110122"]
    assert doc("logout")["event.type_codes"] == ["110123"]
    assert doc("app_start")["event.type_codes"] == ["110120"]
    assert doc("app_stop")["user.id"] == "3f1c-sub"
    used = doc("audit_log_used")
    assert used["event.id"] == "110101" and used["event.action"] == "R"


def _mapped_paths(properties: dict, prefix: str = "") -> set[str]:
    paths = set()
    for key, value in properties.items():
        if "properties" in value:
            paths |= _mapped_paths(value["properties"], f"{prefix}{key}.")
        else:
            paths.add(prefix + key)
    return paths


@pytest.mark.parametrize("name", sorted(ALL))
def test_every_document_field_is_mapped(name: str) -> None:
    # dynamic=false keeps unknown fields in _source but unsearchable: catch drift here instead.
    mapped = _mapped_paths(json.loads(TEMPLATE_PATH.read_text())["template"]["mappings"]["properties"])
    assert set(doc(name)) <= mapped


def test_template_prefix_substitution_and_settings() -> None:
    template = load_template("site-a-audit")
    # a monthly index begins with its year: "site-a-audit-staging-*" is another deployment's
    assert template["index_patterns"] == [f"site-a-audit-{d}*" for d in range(10)]
    assert event_indices("site-a-audit") == "site-a-audit-*,-site-a-audit-*-*"
    settings = template["template"]["settings"]
    assert settings["index.number_of_shards"] == 1 and settings["index.number_of_replicas"] == 0
    xml_mapping = template["template"]["mappings"]["properties"]["atna"]["properties"]["xml"]
    assert xml_mapping["index"] is False


def test_atna_xml_in_document_is_the_message() -> None:
    root = etree.fromstring(doc("export")["atna.xml"].encode("utf-8"))
    assert root.tag == "AuditMessage"
