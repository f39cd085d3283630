"""The Elasticsearch document of an audit event, and the time-based index it belongs to.

The document is a flat, searchable projection of the audit message plus the message itself:
every searchable field is a top-level dotted key holding a keyword (or a list of keywords), so a
privacy officer's ``terms`` query on ``patient.ids`` or ``user.id`` needs no nested queries. The
authoritative record is ``atna.xml`` (the PS3.15 A.5.1 message, stored but not indexed); the flat
fields are derived from it at write time and never edited afterwards. Field list and mapping:
``audit/elasticsearch/audit-events.template.json`` and its README.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from compliance.audit.atna import AuditSource, event_datetime, to_atna_xml
from compliance.audit.codes import REALM_ROLE_SCHEME, ObjectIDTypeCode, ObjectRole, ObjectType
from compliance.audit.message import UNVERIFIED_PREFIX, AuditEvent, ParticipantKind

__all__ = ["event_indices", "index_name", "to_document"]


def event_indices(prefix: str) -> str:
    """The index expression that reads this deployment's monthly event indices ``{prefix}-YYYY.MM``
    and no other deployment's: ``{prefix}-*`` minus every ``{prefix}-…-…``, which is where a
    deployment whose prefix extends this one's keeps its events (``{prefix}-staging-2026.11``).
    Checkpoints are in ``{prefix}.checkpoints``, which neither part matches."""
    return f"{prefix}-*,-{prefix}-*-*"


def index_name(prefix: str, occurred_at: datetime) -> str:
    """The monthly index an event belongs to: ``{prefix}-YYYY.MM`` (UTC month of the event)."""
    if occurred_at.tzinfo is None:
        raise ValueError("occurred_at must be timezone-aware")
    return f"{prefix}-{occurred_at.astimezone(UTC):%Y.%m}"


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))


def to_document(event: AuditEvent, source: AuditSource) -> dict[str, Any]:
    """Project ``event`` to its Elasticsearch document (keys as in the index template)."""
    persons = [p for p in event.participants if p.kind is ParticipantKind.PERSON]
    # The user is the requesting person; in a security alert the person performed but did not request.
    person = next((p for p in persons if p.is_requestor), persons[0] if persons else None)
    client = next((p for p in event.participants if p.kind is ParticipantKind.CLIENT), None)
    unverified = next((p for p in event.participants if p.kind is ParticipantKind.UNVERIFIED), None)
    recipients = [p.user_id for p in event.participants if p.kind is ParticipantKind.RECIPIENT]
    source_address = next(
        (
            p.network_access_point_id
            for p in (person, client, unverified)
            if p is not None and p.network_access_point_id
        ),
        None,
    )

    patients = [
        o
        for o in event.objects
        if o.type_code is ObjectType.PERSON and o.type_code_role is ObjectRole.PATIENT
    ]
    studies = [o for o in event.objects if o.id_type_code == ObjectIDTypeCode.STUDY_INSTANCE_UID]
    sop_classes = [o.id for o in event.objects if o.id_type_code == ObjectIDTypeCode.SOP_CLASS_UID]
    instance_count = 0
    for study in studies:
        if study.description is not None:
            for sop in study.description.sop_classes:
                sop_classes.append(sop.uid)
                instance_count += sop.number_of_instances

    unverified_claim = None
    if unverified is not None and unverified.alternative_user_id:
        unverified_claim = unverified.alternative_user_id.removeprefix(UNVERIFIED_PREFIX)

    return {
        "@timestamp": event_datetime(event),
        "event.uuid": event.uuid,
        "event.id": event.event_id.code.code,
        "event.name": event.event_id.code.display,
        "event.action": event.action.value,
        "event.outcome": int(event.outcome),
        "event.outcome_description": event.outcome_description,
        "event.type_codes": [c.code for c in event.event_type_codes],
        "event.type_names": [c.display for c in event.event_type_codes],
        "user.id": person.user_id if person else None,
        "user.name": person.user_name if person else None,
        "user.roles": [c.code for c in person.role_id_codes if c.scheme == REALM_ROLE_SCHEME]
        if person
        else [],
        "user.unverified_claim": unverified_claim,
        "client.id": client.user_id if client else None,
        "source.address": source_address,
        "participant.ids": _unique([p.user_id for p in event.participants]),
        "patient.ids": _unique([o.id for o in patients]),
        "patient.names": _unique([o.name or "" for o in patients]),
        "study.uids": _unique([o.id for o in studies]),
        "sop_class.uids": _unique(sop_classes),
        "instance_count": instance_count,
        "object.ids": _unique([o.id for o in event.objects]),
        "purpose_of_use": [c.code for c in event.purpose_of_use],
        "recipient": recipients[0] if recipients else None,
        "audit_source.id": source.source_id,
        "audit_source.site_id": source.enterprise_site_id,
        "atna.xml": to_atna_xml(event, source).decode("utf-8"),
    }


def document_time(document: Mapping[str, Any]) -> datetime:
    """A document's ``@timestamp`` as an aware UTC datetime."""
    return datetime.fromisoformat(str(document["@timestamp"]).replace("Z", "+00:00")).astimezone(UTC)


def document_values(document: Mapping[str, Any], key: str) -> list[str]:
    """A field of a document as strings: its list, its single value, or nothing."""
    value = document.get(key)
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]
