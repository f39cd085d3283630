"""Rendering of audit events as DICOM PS3.15 A.5.1 ``AuditMessage`` XML (IHE ATNA, ITI-20 payload).

The output is UTF-8 XML with no namespace, element order as the schema's sequences require:
EventIdentification, ActiveParticipant+, AuditSourceIdentification, ParticipantObjectIdentification*.
ParticipantObjectQuery and ParticipantObjectDetail values are base64 (xsd:base64Binary), so query
strings and free text reach the log byte for byte, whatever XML they contain.

:func:`validate_atna_xml` checks a message against the project's own schema,
``audit/schema/dicom-audit-message.xsd`` (PS3.15 2024d A.5.1), parsed once per process.
"""

from __future__ import annotations

import base64
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

from lxml import etree

from compliance.audit.events import ActiveParticipant, AuditEvent, Code, ParticipantObject
from compliance.audit.interfaces import AuditMessageInvalid
from compliance.config import PROJECT_ROOT

__all__ = [
    "SCHEMA_PATH",
    "AuditSource",
    "AuditSourceType",
    "event_datetime",
    "to_atna_xml",
    "validate_atna_xml",
]

#: The project's own schema, written from PS3.15 A.5.1 (see audit/schema/README.md).
SCHEMA_PATH = PROJECT_ROOT / "audit" / "schema" / "dicom-audit-message.xsd"


class AuditSourceType:
    """PS3.15 A.5.1.2.1 Audit Source Type Code (the RFC 3881 values)."""

    END_USER_DISPLAY_DEVICE = Code("1", "DCM", "End-user display device, diagnostic device")
    DATA_ACQUISITION_DEVICE = Code("2", "DCM", "Data acquisition device or instrument")
    WEB_SERVER = Code("3", "DCM", "Web Server process or thread")
    APPLICATION_SERVER = Code("4", "DCM", "Application Server process or thread")
    DATABASE_SERVER = Code("5", "DCM", "Database Server process or thread")
    SECURITY_SERVER = Code("6", "DCM", "Security server, e.g., a domain controller")
    NETWORK_COMPONENT = Code("7", "DCM", "ISO level 1-3 network component")
    OPERATING_SOFTWARE = Code("8", "DCM", "ISO level 4-6 operating software")
    OTHER = Code("9", "DCM", "other")


@dataclass(frozen=True)
class AuditSource:
    """AuditSourceIdentification: who writes the audit record (settings.audit_source_id / site id)."""

    source_id: str
    enterprise_site_id: str | None = None
    type_codes: tuple[Code, ...] = (AuditSourceType.APPLICATION_SERVER,)


def event_datetime(event: AuditEvent) -> str:
    """EventDateTime in UTC with millisecond precision and a ``Z`` (PS3.15 A.5.2.5)."""
    return event.occurred_at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Characters XML 1.0 cannot carry at all. Caller-controlled strings (an unverified token claim, a
# patient name from a bad header) must not be able to make the audit record itself fail.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _x(value: str) -> str:
    return _NOT_XML.sub("\ufffd", value)


def _sub(parent: etree._Element, tag: str, attrs: dict[str, str] | None = None) -> etree._Element:
    return etree.SubElement(parent, tag, {k: _x(v) for k, v in (attrs or {}).items()})


def _coded(parent: etree._Element, tag: str, code: Code) -> etree._Element:
    attrs = {"csd-code": code.code, "codeSystemName": code.scheme, "originalText": code.display}
    return _sub(parent, tag, attrs)


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _participant(root: etree._Element, p: ActiveParticipant) -> None:
    attrs = {"UserID": p.user_id}
    if p.alternative_user_id:
        attrs["AlternativeUserID"] = p.alternative_user_id
    if p.user_name:
        attrs["UserName"] = p.user_name
    attrs["UserIsRequestor"] = "true" if p.is_requestor else "false"
    if p.network_access_point_id:
        attrs["NetworkAccessPointID"] = p.network_access_point_id
        if p.network_access_point_type is not None:
            attrs["NetworkAccessPointTypeCode"] = str(int(p.network_access_point_type))
    element = _sub(root, "ActiveParticipant", attrs)
    for role in p.role_id_codes:
        _coded(element, "RoleIDCode", role)
    if p.media_type is not None:
        _coded(_sub(element, "MediaIdentifier"), "MediaType", p.media_type)


def _object(root: etree._Element, o: ParticipantObject) -> None:
    attrs = {
        "ParticipantObjectID": o.id,
        "ParticipantObjectTypeCode": str(int(o.type_code)),
        "ParticipantObjectTypeCodeRole": str(int(o.type_code_role)),
    }
    if o.data_life_cycle is not None:
        attrs["ParticipantObjectDataLifeCycle"] = str(int(o.data_life_cycle))
    if o.sensitivity:
        attrs["ParticipantObjectSensitivity"] = o.sensitivity
    element = _sub(root, "ParticipantObjectIdentification", attrs)
    _coded(element, "ParticipantObjectIDTypeCode", o.id_type_code)
    if o.query is not None:
        _sub(element, "ParticipantObjectQuery").text = _b64(o.query)
    else:
        _sub(element, "ParticipantObjectName").text = _x(o.name or "")
    for detail_type, value in o.details:
        _sub(element, "ParticipantObjectDetail", {"type": detail_type, "value": _b64(value)})
    d = o.description
    if d is not None:
        desc = _sub(element, "ParticipantObjectDescription")
        for uid in d.mpps_uids:
            _sub(desc, "MPPS", {"UID": uid})
        for number in d.accession_numbers:
            _sub(desc, "Accession", {"Number": number})
        for sop in d.sop_classes:
            sop_attrs = {"UID": sop.uid, "NumberOfInstances": str(sop.number_of_instances)}
            sop_el = _sub(desc, "SOPClass", sop_attrs)
            for instance_uid in sop.instance_uids:
                _sub(sop_el, "Instance", {"UID": instance_uid})
        if d.contains_studies:
            contains = _sub(desc, "ParticipantObjectContainsStudy")
            for uid in d.contains_studies:
                _sub(contains, "StudyIDs", {"UID": uid})
        if d.encrypted is not None:
            _sub(desc, "Encrypted").text = "true" if d.encrypted else "false"
        if d.anonymized is not None:
            _sub(desc, "Anonymized").text = "true" if d.anonymized else "false"


def to_atna_xml(event: AuditEvent, source: AuditSource) -> bytes:
    """Render ``event`` as an ``AuditMessage`` (PS3.15 A.5.1), UTF-8 with an XML declaration."""
    root = etree.Element("AuditMessage")
    ident = _sub(
        root,
        "EventIdentification",
        {
            "EventActionCode": str(event.action.value),
            "EventDateTime": event_datetime(event),
            "EventOutcomeIndicator": str(int(event.outcome)),
        },
    )
    _coded(ident, "EventID", event.event_id.code)
    for type_code in event.event_type_codes:
        _coded(ident, "EventTypeCode", type_code)
    if event.outcome_description:
        _sub(ident, "EventOutcomeDescription").text = _x(event.outcome_description)
    for purpose in event.purpose_of_use:
        _coded(ident, "PurposeOfUse", purpose)
    for participant in event.participants:
        _participant(root, participant)
    source_attrs = {}
    if source.enterprise_site_id:
        source_attrs["AuditEnterpriseSiteID"] = source.enterprise_site_id
    source_attrs["AuditSourceID"] = source.source_id
    source_el = _sub(root, "AuditSourceIdentification", source_attrs)
    for type_code in source.type_codes:
        _coded(source_el, "AuditSourceTypeCode", type_code)
    for obj in event.objects:
        _object(root, obj)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


_schema_lock = threading.Lock()
_schemas: dict[Path, etree.XMLSchema] = {}


def load_schema(path: Path = SCHEMA_PATH) -> etree.XMLSchema:
    """Parse an XSD once per process (parsing costs far more than validating)."""
    with _schema_lock:
        schema = _schemas.get(path)
        if schema is None:
            schema = etree.XMLSchema(etree.parse(str(path)))
            _schemas[path] = schema
        return schema


def validate_atna_xml(xml: bytes, *, schema_path: Path = SCHEMA_PATH) -> None:
    """Raise :class:`AuditMessageInvalid` unless ``xml`` is a valid PS3.15 A.5.1 AuditMessage."""
    try:
        parser = etree.XMLParser(resolve_entities=False, no_network=True)
        document = etree.fromstring(xml, parser)
    except etree.XMLSyntaxError as exc:
        raise AuditMessageInvalid(f"audit message is not well-formed XML: {exc}", errors=[str(exc)]) from exc
    schema = load_schema(schema_path)
    # XMLSchema objects keep their error log per instance: validate under the lock for thread safety.
    with _schema_lock:
        valid = schema.validate(document)
        errors: Sequence[str] = [f"line {e.line}: {e.message}" for e in schema.error_log] if not valid else ()
    if not valid:
        raise AuditMessageInvalid("audit message does not validate against PS3.15 A.5.1", errors=errors)
