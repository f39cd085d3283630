"""The audit message model (DICOM PS3.15 A.5.1, IHE ATNA) and the references callers give builders.

The dataclasses mirror the audit message of PS3.15 A.5.1 one to one (``AuditEvent`` is
EventIdentification plus its participants and objects; the audit source is added at rendering time,
see :mod:`compliance.audit.atna`). Callers should not assemble them by hand: the builders of
:mod:`compliance.audit.events` follow the tables of PS3.15 A.5.3. ``UserRef``, ``PatientRef`` and
``StudyRef`` are what callers hand those builders. Code values: :mod:`compliance.audit.codes`.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from uuid6 import uuid7

from compliance.audit.codes import (
    Action,
    Code,
    DataLifeCycle,
    EventID,
    NetworkAccessPointType,
    ObjectRole,
    ObjectType,
    Outcome,
)

__all__ = [
    "UNAUTHENTICATED_USER_ID",
    "UNVERIFIED_PREFIX",
    "ActiveParticipant",
    "AuditEvent",
    "ObjectDescription",
    "ParticipantKind",
    "ParticipantObject",
    "PatientRef",
    "SOPClassRef",
    "StudyRef",
    "UserRef",
    "network_access_point_type",
]

#: UserID recorded for a performing participant whose identity could not be verified.
UNAUTHENTICATED_USER_ID = "unauthenticated"
#: Prefix marking an AlternativeUserID that is a caller's unverified claim, not a verified identity.
UNVERIFIED_PREFIX = "unverified:"


class ParticipantKind(enum.StrEnum):
    """What a participant is to the gateway. Not rendered in XML; drives the Elasticsearch document."""

    UNSPECIFIED = "unspecified"
    PERSON = "person"
    CLIENT = "client"
    GATEWAY = "gateway"
    SOURCE = "source"
    DESTINATION = "destination"
    RECIPIENT = "recipient"
    MEDIA = "media"
    UNVERIFIED = "unverified"


@dataclass(frozen=True)
class ActiveParticipant:
    user_id: str
    user_name: str | None = None
    alternative_user_id: str | None = None
    is_requestor: bool = False
    network_access_point_id: str | None = None
    network_access_point_type: NetworkAccessPointType | None = None
    role_id_codes: tuple[Code, ...] = ()
    #: MediaIdentifier/MediaType, for Destination/Source Media participants (PS3.15 A.5.3.4/A.5.3.5).
    media_type: Code | None = None
    kind: ParticipantKind = ParticipantKind.UNSPECIFIED

    def __post_init__(self) -> None:
        if not self.user_id:
            raise ValueError("ActiveParticipant.user_id is required (PS3.15 A.5.2.1)")
        if self.network_access_point_id and self.network_access_point_type is None:
            object.__setattr__(
                self, "network_access_point_type", network_access_point_type(self.network_access_point_id)
            )


@dataclass(frozen=True)
class SOPClassRef:
    uid: str
    number_of_instances: int
    instance_uids: tuple[str, ...] = ()


@dataclass(frozen=True)
class ObjectDescription:
    """ParticipantObjectDescription (PS3.15 A.5.1, DICOMObjectDescriptionContents)."""

    mpps_uids: tuple[str, ...] = ()
    accession_numbers: tuple[str, ...] = ()
    sop_classes: tuple[SOPClassRef, ...] = ()
    contains_studies: tuple[str, ...] = ()
    encrypted: bool | None = None
    anonymized: bool | None = None


@dataclass(frozen=True)
class ParticipantObject:
    """ParticipantObjectIdentification. Exactly one of ``name`` and ``query`` (PS3.15 CP-2399)."""

    id: str
    type_code: ObjectType
    type_code_role: ObjectRole
    id_type_code: Code
    name: str | None = None
    query: bytes | None = None
    data_life_cycle: DataLifeCycle | None = None
    sensitivity: str | None = None
    #: ParticipantObjectDetail ``(type, value)`` pairs; values are raw bytes, base64 in the XML.
    details: tuple[tuple[str, bytes], ...] = ()
    description: ObjectDescription | None = None

    def __post_init__(self) -> None:
        if (self.name is None) == (self.query is None):
            raise ValueError("ParticipantObject needs exactly one of name and query (PS3.15 A.5.1)")


@dataclass(frozen=True)
class AuditEvent:
    event_id: EventID
    action: Action
    outcome: Outcome
    occurred_at: datetime
    event_type_codes: tuple[Code, ...] = ()
    participants: tuple[ActiveParticipant, ...] = ()
    objects: tuple[ParticipantObject, ...] = ()
    outcome_description: str | None = None
    purpose_of_use: tuple[Code, ...] = ()
    #: The idempotent document id in the audit repository: a time-ordered UUID (RFC 9562 version 7),
    #: so that the outbox's unique index and Elasticsearch's ``_id`` lookups take new ids at their end
    #: instead of at random places (random version 4 ids cost the outbox a fifth of its CPU per event).
    uuid: str = field(default_factory=lambda: str(uuid7()))

    def __post_init__(self) -> None:
        if self.occurred_at.tzinfo is None or self.occurred_at.utcoffset() is None:
            raise ValueError("AuditEvent.occurred_at must be timezone-aware (PS3.15 A.5.2.5)")
        object.__setattr__(self, "occurred_at", self.occurred_at.astimezone(UTC))
        object.__setattr__(self, "action", Action(self.action))
        object.__setattr__(self, "outcome", Outcome(self.outcome))
        if not self.participants:
            raise ValueError("an audit message needs at least one ActiveParticipant (PS3.15 A.5.1)")


# --------------------------------------------------------------------------- caller-facing refs


@dataclass(frozen=True)
class UserRef:
    """The verified caller, as the gateway knows it from the token (see ``auth.Principal``)."""

    user_id: str
    username: str | None = None
    client_id: str | None = None
    roles: tuple[str, ...] = ()
    source_address: str | None = None


@dataclass(frozen=True)
class PatientRef:
    patient_id: str
    name: str | None = None


@dataclass(frozen=True)
class StudyRef:
    study_uid: str
    #: SOP Class UID -> number of instances of that class touched by the event.
    sop_classes: Mapping[str, int] = field(default_factory=dict)
    accession: str | None = None


@functools.lru_cache(maxsize=4096)
def network_access_point_type(value: str) -> NetworkAccessPointType:
    """PS3.15 A.5.2.4: 2 for an IP address, 5 for a URI, 1 (machine name) otherwise."""
    try:
        ipaddress.ip_address(value.split("%", 1)[0])
        return NetworkAccessPointType.IP_ADDRESS
    except ValueError:
        pass
    if "://" in value:
        return NetworkAccessPointType.URI
    return NetworkAccessPointType.MACHINE_NAME
