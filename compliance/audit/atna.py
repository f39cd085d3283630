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
import functools
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

from lxml import etree

from compliance.audit.codes import AuditSourceType, Code
from compliance.audit.interfaces import AuditMessageInvalid
from compliance.audit.message import ActiveParticipant, AuditEvent, ParticipantObject
from compliance.config import PROJECT_ROOT

__all__ = [
    "SCHEMA_PATH",
    "AuditSource",
    "event_datetime",
    "to_atna_xml",
    "validate_atna_xml",
]

#: The project's own schema, written from PS3.15 A.5.1 (see audit/schema/README.md).
SCHEMA_PATH = PROJECT_ROOT / "audit" / "schema" / "dicom-audit-message.xsd"


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
_ATTR_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
                               "\t": "&#9;", "\n": "&#10;", "\r": "&#13;"})
_TEXT_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"})
_XML_DECLARATION = "<?xml version='1.0' encoding='UTF-8'?>\n"

# The message is written as text (one audit event per audited request: the serializer is on the hot
# path), escaped exactly as lxml escapes it; tests/unit/audit/test_audit_atna.py checks the output
# against lxml's and validates it against the schema.


#: Printable ASCII that needs no escaping anywhere (no & < > "): most values (UIDs, IDs, codes).
_PLAIN = re.compile(r'[ !#-%\'-;=?-~]*').fullmatch


def _xml_chars(value: str) -> str:
    """``value`` with the characters XML 1.0 cannot carry replaced by U+FFFD."""
    if value.isascii() and value.isprintable():
        return value
    return _NOT_XML.sub("\ufffd", value)


def _attr(value: str) -> str:
    return value if _PLAIN(value) else _xml_chars(value).translate(_ATTR_ESCAPES)


def _attrs(attrs: dict[str, str]) -> str:
    return "".join([f' {k}="{_attr(v)}"' for k, v in attrs.items()])


def _text_element(tag: str, value: str) -> str:
    text = value if _PLAIN(value) else _xml_chars(value).translate(_TEXT_ESCAPES)
    return f"<{tag}>{text}</{tag}>" if text else f"<{tag}/>"


@functools.lru_cache(maxsize=4096)
def _coded(tag: str, code: Code) -> str:
    return (f'<{tag} csd-code="{_attr(code.code)}" codeSystemName="{_attr(code.scheme)}" '
            f'originalText="{_attr(code.display)}"/>')



def _element(tag: str, attrs: dict[str, str], children: list[str]) -> str:
    if not children:
        return f"<{tag}{_attrs(attrs)}/>"
    return f"<{tag}{_attrs(attrs)}>{''.join(children)}</{tag}>"


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _participant(p: ActiveParticipant) -> str:
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
    children = [_coded("RoleIDCode", role) for role in p.role_id_codes]
    if p.media_type is not None:
        children.append(f"<MediaIdentifier>{_coded('MediaType', p.media_type)}</MediaIdentifier>")
    return _element("ActiveParticipant", attrs, children)


def _object(o: ParticipantObject) -> str:
    attrs = {
        "ParticipantObjectID": o.id,
        "ParticipantObjectTypeCode": str(int(o.type_code)),
        "ParticipantObjectTypeCodeRole": str(int(o.type_code_role)),
    }
    if o.data_life_cycle is not None:
        attrs["ParticipantObjectDataLifeCycle"] = str(int(o.data_life_cycle))
    if o.sensitivity:
        attrs["ParticipantObjectSensitivity"] = o.sensitivity
    children = [_coded("ParticipantObjectIDTypeCode", o.id_type_code)]
    if o.query is not None:
        children.append(_text_element("ParticipantObjectQuery", _b64(o.query)))
    else:
        children.append(_text_element("ParticipantObjectName", o.name or ""))
    for detail_type, value in o.details:
        children.append(_element("ParticipantObjectDetail", {"type": detail_type, "value": _b64(value)}, []))
    d = o.description
    if d is not None:
        desc = [_element("MPPS", {"UID": uid}, []) for uid in d.mpps_uids]
        desc += [_element("Accession", {"Number": number}, []) for number in d.accession_numbers]
        for sop in d.sop_classes:
            desc.append(_element("SOPClass", {"UID": sop.uid, "NumberOfInstances": str(sop.number_of_instances)},
                                 [_element("Instance", {"UID": uid}, []) for uid in sop.instance_uids]))
        if d.contains_studies:
            desc.append(_element("ParticipantObjectContainsStudy", {},
                                 [_element("StudyIDs", {"UID": uid}, []) for uid in d.contains_studies]))
        if d.encrypted is not None:
            desc.append(f"<Encrypted>{'true' if d.encrypted else 'false'}</Encrypted>")
        if d.anonymized is not None:
            desc.append(f"<Anonymized>{'true' if d.anonymized else 'false'}</Anonymized>")
        children.append(_element("ParticipantObjectDescription", {}, desc))
    return _element("ParticipantObjectIdentification", attrs, children)


def _source(source: AuditSource) -> str:
    attrs = {}
    if source.enterprise_site_id:
        attrs["AuditEnterpriseSiteID"] = source.enterprise_site_id
    attrs["AuditSourceID"] = source.source_id
    return _element("AuditSourceIdentification", attrs,
                    [_coded("AuditSourceTypeCode", type_code) for type_code in source.type_codes])


def to_atna_xml(event: AuditEvent, source: AuditSource) -> bytes:
    """Render ``event`` as an ``AuditMessage`` (PS3.15 A.5.1), UTF-8 with an XML declaration."""
    ident = [_coded("EventID", event.event_id.code)]
    ident += [_coded("EventTypeCode", type_code) for type_code in event.event_type_codes]
    if event.outcome_description:
        ident.append(_text_element("EventOutcomeDescription", event.outcome_description))
    ident += [_coded("PurposeOfUse", purpose) for purpose in event.purpose_of_use]
    parts = [_XML_DECLARATION, "<AuditMessage>",
             _element("EventIdentification", {"EventActionCode": str(event.action.value),
                                               "EventDateTime": event_datetime(event),
                                               "EventOutcomeIndicator": str(int(event.outcome))}, ident)]
    parts += [_participant(participant) for participant in event.participants]
    parts.append(_source(source))
    parts += [_object(obj) for obj in event.objects]
    parts.append("</AuditMessage>")
    return "".join(parts).encode("utf-8")


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
