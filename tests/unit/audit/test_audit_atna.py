"""ATNA XML rendering of every builder, validated against the project's schema and the shared one."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path

import pytest
from lxml import etree

from compliance.audit.atna import AuditSource, load_schema, to_atna_xml, validate_atna_xml
from compliance.audit.codes import Action, DataLifeCycle, EventTypeCode, Outcome
from compliance.audit.events import (
    application_activity_event,
    audit_log_used_event,
    authentication_event,
    export_event,
    import_event,
    instances_accessed_event,
    instances_transferred_event,
    query_event,
    security_alert_event,
    study_deleted_event,
)
from compliance.audit.interfaces import AuditMessageInvalid
from compliance.audit.message import PatientRef, StudyRef, UserRef
from compliance.config import PROJECT_ROOT

SHARED_XSD = PROJECT_ROOT.parent / "shared" / "standards" / "dicom-audit-message-2024d.xsd"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
WHEN = datetime(2024, 3, 31, 23, 59, 59, 123456, tzinfo=UTC)

SOURCE = AuditSource("compliance-gateway", "demo-hospital")
USER = UserRef("3f1c-sub", "alice", "ohif-viewer", ("radiologist", "clinician"), "10.1.2.3")
PATIENT = PatientRef("PAT-001", "Yamada^Tarou=山田^太郎")
STUDY = StudyRef("1.2.826.0.1.3680043.8.498.1", {CT: 120, MR: 3}, "ACC<&>1")
QUERY = b"PatientID=PAT-001&StudyDate=20240101-&includefield=<script>&x=\x00\xff"


def builders() -> dict[str, object]:
    return {
        "query": query_event(
            user=USER,
            gateway_id="gw-1",
            outcome=Outcome.SUCCESS,
            query=QUERY,
            sop_class_uid="1.2.840.10008.5.1.4.1.2.2.1",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            patients=[PATIENT],
            occurred_at=WHEN,
        ),
        "qido_query": query_event(
            user=UserRef("sub-2"),
            gateway_id="gw-1",
            outcome=Outcome.SUCCESS,
            query=b"PatientName=Y*",
            sop_class_uid=None,
            resource="/dicom-web/studies",
            occurred_at=WHEN,
        ),
        "accessed": instances_accessed_event(
            user=USER,
            gateway_id="gw-1",
            action=Action.READ,
            outcome=Outcome.SUCCESS,
            patients=[PATIENT],
            studies=[STUDY],
            event_type_codes=[EventTypeCode.EMERGENCY_OVERRIDE_STARTED],
            purpose_of_use=["ETREAT"],
            occurred_at=WHEN,
        ),
        "transferred": instances_transferred_event(
            user=USER,
            gateway_id="gw-1",
            source_id="orthanc-archive",
            outcome=Outcome.SUCCESS,
            patients=[PATIENT],
            studies=[STUDY],
            occurred_at=WHEN,
        ),
        "import": import_event(
            user=USER, gateway_id="gw-1", outcome=Outcome.SUCCESS, patients=[PATIENT], studies=[STUDY]
        ),
        "export": export_event(
            user=USER,
            recipient="mailto:researcher@univ.example",
            purpose="HRESCH",
            patients=[PATIENT, PatientRef("PAT-002", None)],
            studies=[STUDY],
        ),
        "deleted": study_deleted_event(
            user=USER,
            gateway_id="gw-1",
            outcome=Outcome.SUCCESS,
            patients=[PATIENT],
            studies=[STUDY],
            life_cycle=DataLifeCycle.PERMANENT_ERASURE,
        ),
        "alert_unknown": security_alert_event(
            user=None,
            gateway_id="gw-1",
            alert_type=EventTypeCode.AUTHENTICATION_DECISION,
            description="token signature invalid <kid=x>",
            resource="/dicom-web/studies",
            source_address="203.0.113.9",
            alternative_user_id="mallory\x01",
        ),
        "alert_denied": security_alert_event(
            user=USER,
            gateway_id="gw-1",
            alert_type=EventTypeCode.ACCESS_CONTROL_DECISION,
            description="role radiologist may not read site B",
            resource="/dicom-web/studies/1.2.3",
            studies=[STUDY],
        ),
        "login": authentication_event(user=USER, gateway_id="gw-1", outcome=Outcome.SUCCESS),
        "logout": authentication_event(
            user=USER, gateway_id="gw-1", outcome=Outcome.SUCCESS, event_type=EventTypeCode.LOGOUT
        ),
        "app_start": application_activity_event("start", gateway_id="gw-1", process_id="4242"),
        "app_stop": application_activity_event("stop", gateway_id="gw-1", launcher=USER),
        "audit_log_used": audit_log_used_event(
            user=USER,
            gateway_id="gw-1",
            outcome=Outcome.SUCCESS,
            audit_log_uri="http://127.0.0.1:9200/compliance-audit-*",
            query=b'{"term": {"patient.ids": "PAT-001"}}',
        ),
    }


ALL = builders()


def parse(event: object) -> etree._Element:
    return etree.fromstring(to_atna_xml(event, SOURCE))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(ALL))
def test_every_builder_validates_against_project_schema(name: str) -> None:
    validate_atna_xml(to_atna_xml(ALL[name], SOURCE))  # type: ignore[arg-type]


@pytest.mark.skipif(not SHARED_XSD.is_file(), reason="shared standards directory absent (fresh clone)")
@pytest.mark.parametrize("name", sorted(ALL))
def test_every_builder_validates_against_shared_schema(name: str) -> None:
    schema = load_schema(SHARED_XSD)
    document = parse(ALL[name])
    assert schema.validate(document), schema.error_log


def test_invalid_message_fails_validation() -> None:
    root = parse(ALL["accessed"])
    root.find("EventIdentification").set("EventOutcomeIndicator", "3")  # type: ignore[union-attr]
    with pytest.raises(AuditMessageInvalid) as info:
        validate_atna_xml(etree.tostring(root))
    assert info.value.errors


def test_missing_participant_fails_validation() -> None:
    root = parse(ALL["query"])
    for participant in root.findall("ActiveParticipant"):
        root.remove(participant)
    with pytest.raises(AuditMessageInvalid):
        validate_atna_xml(etree.tostring(root))


def test_malformed_xml_fails_validation() -> None:
    with pytest.raises(AuditMessageInvalid):
        validate_atna_xml(b"<AuditMessage><EventIdentification>")


def test_xml_is_utf8_with_declaration() -> None:
    xml = to_atna_xml(ALL["accessed"], SOURCE)
    assert xml.startswith(b"<?xml version='1.0' encoding='UTF-8'?>")
    assert "山田".encode() in xml


def test_event_identification() -> None:
    ident = parse(ALL["accessed"]).find("EventIdentification")
    assert ident is not None
    assert ident.get("EventActionCode") == "R"
    assert ident.get("EventOutcomeIndicator") == "0"
    assert ident.get("EventDateTime") == "2024-03-31T23:59:59.123Z"
    event_id = ident.find("EventID")
    assert event_id is not None
    assert (event_id.get("csd-code"), event_id.get("codeSystemName"), event_id.get("originalText")) == (
        "110103",
        "DCM",
        "DICOM Instances Accessed",
    )
    assert [e.get("csd-code") for e in ident.findall("EventTypeCode")] == ["110127"]
    assert [e.get("csd-code") for e in ident.findall("PurposeOfUse")] == ["ETREAT"]


def test_requestor_and_roles() -> None:
    root = parse(ALL["accessed"])
    participants = root.findall("ActiveParticipant")
    by_id = {p.get("UserID"): p for p in participants}
    person = by_id["3f1c-sub"]
    assert person.get("UserIsRequestor") == "true"
    assert person.get("UserName") == "alice"
    assert person.get("NetworkAccessPointID") == "10.1.2.3"
    assert person.get("NetworkAccessPointTypeCode") == "2"
    roles = {(r.get("csd-code"), r.get("codeSystemName")) for r in person.findall("RoleIDCode")}
    assert roles == {("radiologist", "imaging-realm-role"), ("clinician", "imaging-realm-role")}
    client = by_id["ohif-viewer"]
    assert client.get("UserIsRequestor") == "false"
    assert {r.get("csd-code") for r in client.findall("RoleIDCode")} == {"110150"}
    assert sum(p.get("UserIsRequestor") == "true" for p in participants) == 1


def _objects(root: etree._Element, id_type: str) -> list[etree._Element]:
    return [
        o
        for o in root.findall("ParticipantObjectIdentification")
        if o.find("ParticipantObjectIDTypeCode").get("csd-code") == id_type  # type: ignore[union-attr]
    ]


def test_patient_and_study_objects() -> None:
    root = parse(ALL["accessed"])
    (patient,) = _objects(root, "2")
    assert patient.get("ParticipantObjectID") == "PAT-001"
    assert patient.get("ParticipantObjectTypeCode") == "1"
    assert patient.get("ParticipantObjectTypeCodeRole") == "1"
    assert patient.findtext("ParticipantObjectName") == "Yamada^Tarou=山田^太郎"
    (study,) = _objects(root, "110180")
    assert study.get("ParticipantObjectID") == STUDY.study_uid
    assert study.get("ParticipantObjectTypeCode") == "2"
    assert study.get("ParticipantObjectTypeCodeRole") == "3"
    description = study.find("ParticipantObjectDescription")
    assert description is not None
    assert description.find("Accession").get("Number") == "ACC<&>1"  # type: ignore[union-attr]
    sop = {s.get("UID"): s.get("NumberOfInstances") for s in description.findall("SOPClass")}
    assert sop == {CT: "120", MR: "3"}
    # Schema order: Accession before SOPClass.
    assert [c.tag for c in description] == ["Accession", "SOPClass", "SOPClass"]


def test_query_base64_round_trip() -> None:
    root = parse(ALL["query"])
    (query_object,) = _objects(root, "110181")
    assert query_object.get("ParticipantObjectID") == "1.2.840.10008.5.1.4.1.2.2.1"
    encoded = query_object.findtext("ParticipantObjectQuery")
    assert encoded is not None
    assert base64.b64decode(encoded) == QUERY
    details = {
        d.get("type"): base64.b64decode(d.get("value"))
        for d in query_object.findall("ParticipantObjectDetail")
    }
    assert details == {"TransferSyntax": b"1.2.840.10008.1.2.1"}


def test_query_roles_follow_table_a_5_3_10() -> None:
    root = parse(ALL["query"])
    roles = {
        p.get("UserID"): {r.get("csd-code") for r in p.findall("RoleIDCode")}
        for p in root.findall("ActiveParticipant")
    }
    assert "110153" in roles["ohif-viewer"]  # process issuing the query
    assert "110152" in roles["gw-1"]  # process responding
    assert "110153" not in roles["3f1c-sub"]  # the person is the other (requesting) participant
    # without a client id the person issues the query
    root = parse(ALL["qido_query"])
    (person,) = [p for p in root.findall("ActiveParticipant") if p.get("UserID") == "sub-2"]
    assert {r.get("csd-code") for r in person.findall("RoleIDCode")} == {"110153"}
    (query_object,) = _objects(root, "12")
    assert query_object.get("ParticipantObjectID") == "/dicom-web/studies"


def test_odd_names_survive_escaping() -> None:
    odd = PatientRef("ID&<1>", 'O\'Brien^Séan "<&>"')
    event = instances_accessed_event(
        user=UserRef("u<1>", "b&o"),
        gateway_id="gw",
        action=Action.READ,
        outcome=Outcome.SUCCESS,
        patients=[odd],
        studies=[StudyRef("1.2.3")],
    )
    xml = to_atna_xml(event, SOURCE)
    validate_atna_xml(xml)
    root = etree.fromstring(xml)
    (patient,) = _objects(root, "2")
    assert patient.get("ParticipantObjectID") == "ID&<1>"
    assert patient.findtext("ParticipantObjectName") == 'O\'Brien^Séan "<&>"'
    assert root.find("ActiveParticipant").get("UserName") == "b&o"  # type: ignore[union-attr]


def test_control_characters_do_not_break_the_record() -> None:
    root = parse(ALL["alert_unknown"])
    unverified = [p for p in root.findall("ActiveParticipant") if p.get("UserID") == "unauthenticated"]
    assert unverified[0].get("AlternativeUserID") == "unverified:mallory\ufffd"
    assert unverified[0].get("NetworkAccessPointID") == "203.0.113.9"
    assert unverified[0].get("UserIsRequestor") == "false"


def test_security_alert_content() -> None:
    root = parse(ALL["alert_unknown"])
    ident = root.find("EventIdentification")
    assert ident.find("EventID").get("csd-code") == "110113"  # type: ignore[union-attr]
    assert ident.find("EventTypeCode").get("csd-code") == "110143"  # type: ignore[union-attr]
    assert ident.findtext("EventOutcomeDescription") == "token signature invalid <kid=x>"  # type: ignore[union-attr]
    assert ident.get("EventOutcomeIndicator") == "4"  # type: ignore[union-attr]
    (subject,) = _objects(root, "12")
    detail = subject.find("ParticipantObjectDetail")
    assert detail.get("type") == "Alert Description"  # type: ignore[union-attr]
    assert base64.b64decode(detail.get("value")) == b"token signature invalid <kid=x>"  # type: ignore[union-attr]


def test_study_deleted_permanent_erasure() -> None:
    root = parse(ALL["deleted"])
    assert root.find("EventIdentification").get("EventActionCode") == "D"  # type: ignore[union-attr]
    (study,) = _objects(root, "110180")
    assert study.get("ParticipantObjectDataLifeCycle") == "15"


def test_export_media_and_anonymized() -> None:
    root = parse(ALL["export"])
    media = [p for p in root.findall("ActiveParticipant") if p.find("MediaIdentifier") is not None]
    assert len(media) == 1
    assert {r.get("csd-code") for r in media[0].findall("RoleIDCode")} == {"110154"}
    (study,) = _objects(root, "110180")
    assert study.findtext("ParticipantObjectDescription/Anonymized") == "true"
    assert len(_objects(root, "2")) == 2
    assert [p.get("csd-code") for p in root.findall("EventIdentification/PurposeOfUse")] == ["HRESCH"]


def test_audit_source() -> None:
    source = parse(ALL["login"]).find("AuditSourceIdentification")
    assert source is not None
    assert source.get("AuditSourceID") == "compliance-gateway"
    assert source.get("AuditEnterpriseSiteID") == "demo-hospital"
    assert source.find("AuditSourceTypeCode").get("csd-code") == "4"  # type: ignore[union-attr]


def test_project_schema_is_its_own_file() -> None:
    project_xsd = PROJECT_ROOT / "audit" / "schema" / "dicom-audit-message.xsd"
    assert project_xsd.is_file()
    if SHARED_XSD.is_file():
        assert project_xsd.read_bytes() != Path(SHARED_XSD).read_bytes()


ODD = ["tab\there", "new\nline", "cr\rhere", 'q"uote', "a'pos", "amp&lt;", "<tag>", "]]>", "é山", "\x01bell\x7f",
       "\U0001f600", "\ud800lone", "\ufffe"]


@pytest.mark.parametrize("name", sorted(ALL))
def test_text_rendering_is_what_lxml_writes(name: str) -> None:
    """The message is written as text: lxml, parsing and re-serialising it, must write the same bytes."""
    xml = to_atna_xml(ALL[name], SOURCE)
    assert etree.tostring(etree.fromstring(xml), xml_declaration=True, encoding="UTF-8") == xml


@pytest.mark.parametrize("odd", ODD)
def test_odd_characters_round_trip_through_attributes_and_text(odd: str) -> None:
    event = security_alert_event(
        user=UserRef(f"u{odd}", f"name{odd}", source_address="10.0.0.1"), gateway_id="gw",
        alert_type=EventTypeCode.NODE_AUTHENTICATION, description=f"why{odd}", resource=f"res{odd}",
        outcome=Outcome.MINOR_FAILURE, source_address="10.0.0.1", patients=(PatientRef(f"P{odd}", f"N{odd}"),))
    xml = to_atna_xml(event, SOURCE)
    validate_atna_xml(xml)
    assert etree.tostring(etree.fromstring(xml), xml_declaration=True, encoding="UTF-8") == xml
    root = etree.fromstring(xml)
    carried = odd if all(c == "\t" or c == "\n" or c == "\r" or c >= " " for c in odd) else None
    user = next(p for p in root.findall("ActiveParticipant") if p.get("UserID") != "gw")
    name = user.get("UserName")
    description = root.findtext("EventIdentification/EventOutcomeDescription")
    if carried is not None and not any(0xD800 <= ord(c) <= 0xDFFF or c in "\ufffe\uffff" for c in odd):
        assert name == f"name{odd}"
        assert description == f"why{odd}"
    else:
        assert "\ufffd" in name and "\ufffd" in description
