"""The audit event model (DICOM PS3.15 A.5, IHE ATNA) and the builders callers use.

The dataclasses mirror the audit message of PS3.15 A.5.1 one to one (``AuditEvent`` is
EventIdentification plus its participants and objects; the audit source is added at rendering time,
see :mod:`compliance.audit.atna`). Callers should not assemble them by hand: each builder below
follows one table of PS3.15 A.5.3 (2024d edition), so the participants, role codes and object type
codes the standard requires are always present.

Code values come from PS3.16 (DCM: CID 400 Audit Event ID, CID 401 Audit Event Type Code,
CID 402 Audit Active Participant Role ID Code, CID 403 Security Alert Type Code, CID 404 Audit
Participant Object ID Type Code, CID 405 Media Type Code) and RFC 3881 (object ID type codes
"2 Patient Number" and "12 URI", as PS3.15 A.5.1.2.4 lists them).

How a gateway request maps onto participants (PS3.15 A.5.2: "if both are known, then two active
participants shall be included (both the person and the process)"):

* the person (token subject) is one ActiveParticipant: ``UserID`` = subject, ``UserName`` = login
  name, ``UserIsRequestor`` = true, realm roles as ``RoleIDCode`` (code = role name, scheme
  :data:`REALM_ROLE_SCHEME`), ``NetworkAccessPointID`` = the client's address;
* the OAuth client (``azp``: viewer, AI service, CLI) is a second ActiveParticipant: ``UserID`` =
  client id, ``UserIsRequestor`` = false, ``RoleIDCode`` (110150, DCM, "Application") — as in the
  PS3.17 WW.3 example — plus whatever source/destination role the event table requires;
* the gateway itself, where a table asks for the responding/receiving/reporting process, is a third
  participant with ``UserID`` = the gateway id.

Where a table requires exactly one "process" with a role (Query: Source Role ID), the client gets
it and the person is listed as an "other participant"; without a client id, the person gets it.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from uuid6 import uuid7

__all__ = [
    "REALM_ROLE_SCHEME",
    "Action",
    "ActiveParticipant",
    "AuditEvent",
    "Code",
    "DataLifeCycle",
    "EventID",
    "EventTypeCode",
    "MediaTypeCode",
    "NetworkAccessPointType",
    "ObjectDescription",
    "ObjectIDTypeCode",
    "ObjectRole",
    "ObjectType",
    "Outcome",
    "ParticipantKind",
    "ParticipantObject",
    "PatientRef",
    "RoleIDCode",
    "SOPClassRef",
    "StudyRef",
    "UserRef",
    "application_activity_event",
    "audit_log_used_event",
    "authentication_event",
    "export_event",
    "import_event",
    "instances_accessed_event",
    "instances_transferred_event",
    "query_event",
    "security_alert_event",
    "study_deleted_event",
]

#: codeSystemName of the RoleIDCode elements that carry the user's realm roles.
REALM_ROLE_SCHEME = "imaging-realm-role"
#: codeSystemName for purposes of use given as plain strings (HL7 v3 ActReason, as IHE XUA uses).
PURPOSE_OF_USE_SCHEME = "2.16.840.1.113883.5.8"
#: UserID recorded for a performing participant whose identity could not be verified.
UNAUTHENTICATED_USER_ID = "unauthenticated"
#: Prefix marking an AlternativeUserID that is a caller's unverified claim, not a verified identity.
UNVERIFIED_PREFIX = "unverified:"


@dataclass(frozen=True)
class Code:
    """A coded value; rendered as ``csd-code`` / ``codeSystemName`` / ``originalText``."""

    code: str
    scheme: str
    display: str


def _dcm(code: str, display: str) -> Code:
    return Code(code, "DCM", display)


class EventID(enum.Enum):
    """PS3.16 CID 400 "Audit Event ID"."""

    APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
    AUDIT_LOG_USED = _dcm("110101", "Audit Log Used")
    BEGIN_TRANSFERRING_DICOM_INSTANCES = _dcm("110102", "Begin Transferring DICOM Instances")
    DICOM_INSTANCES_ACCESSED = _dcm("110103", "DICOM Instances Accessed")
    DICOM_INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
    DICOM_STUDY_DELETED = _dcm("110105", "DICOM Study Deleted")
    EXPORT = _dcm("110106", "Export")
    IMPORT = _dcm("110107", "Import")
    NETWORK_ENTRY = _dcm("110108", "Network Entry")
    ORDER_RECORD = _dcm("110109", "Order Record")
    PATIENT_RECORD = _dcm("110110", "Patient Record")
    PROCEDURE_RECORD = _dcm("110111", "Procedure Record")
    QUERY = _dcm("110112", "Query")
    SECURITY_ALERT = _dcm("110113", "Security Alert")
    USER_AUTHENTICATION = _dcm("110114", "User Authentication")

    @property
    def code(self) -> Code:
        return self.value


class EventTypeCode:
    """PS3.16 CID 401 "Audit Event Type Code" (CID 403 "Security Alert Type Code" is the same list)."""

    APPLICATION_START = _dcm("110120", "Application Start")
    APPLICATION_STOP = _dcm("110121", "Application Stop")
    LOGIN = _dcm("110122", "Login")
    LOGOUT = _dcm("110123", "Logout")
    ATTACH = _dcm("110124", "Attach")
    DETACH = _dcm("110125", "Detach")
    NODE_AUTHENTICATION = _dcm("110126", "Node Authentication")
    EMERGENCY_OVERRIDE_STARTED = _dcm("110127", "Emergency Override Started")
    NETWORK_CONFIGURATION = _dcm("110128", "Network Configuration")
    SECURITY_CONFIGURATION = _dcm("110129", "Security Configuration")
    HARDWARE_CONFIGURATION = _dcm("110130", "Hardware Configuration")
    SOFTWARE_CONFIGURATION = _dcm("110131", "Software Configuration")
    USE_OF_RESTRICTED_FUNCTION = _dcm("110132", "Use of Restricted Function")
    AUDIT_RECORDING_STOPPED = _dcm("110133", "Audit Recording Stopped")
    AUDIT_RECORDING_STARTED = _dcm("110134", "Audit Recording Started")
    OBJECT_SECURITY_ATTRIBUTES_CHANGED = _dcm("110135", "Object Security Attributes Changed")
    SECURITY_ROLES_CHANGED = _dcm("110136", "Security Roles Changed")
    USER_SECURITY_ATTRIBUTES_CHANGED = _dcm("110137", "User Security Attributes Changed")
    EMERGENCY_OVERRIDE_STOPPED = _dcm("110138", "Emergency Override Stopped")
    REMOTE_SERVICE_OPERATION_STARTED = _dcm("110139", "Remote Service Operation Started")
    REMOTE_SERVICE_OPERATION_STOPPED = _dcm("110140", "Remote Service Operation Stopped")
    LOCAL_SERVICE_OPERATION_STARTED = _dcm("110141", "Local Service Operation Started")
    LOCAL_SERVICE_OPERATION_STOPPED = _dcm("110142", "Local Service Operation Stopped")
    AUTHENTICATION_DECISION = _dcm("110143", "Authentication Decision")
    AUTHORIZATION_DECISION = _dcm("110144", "Authorization Decision")
    SESSION_START = _dcm("110145", "Session start")
    SESSION_STOP = _dcm("110146", "Session stop")
    ACCESS_CONTROL_DECISION = _dcm("110147", "Access Control Decision")

    @classmethod
    def all(cls) -> tuple[Code, ...]:
        return tuple(v for v in vars(cls).values() if isinstance(v, Code))


class RoleIDCode:
    """PS3.16 CID 402 "Audit Active Participant Role ID Code"."""

    APPLICATION = _dcm("110150", "Application")
    APPLICATION_LAUNCHER = _dcm("110151", "Application Launcher")
    DESTINATION_ROLE_ID = _dcm("110152", "Destination Role ID")
    SOURCE_ROLE_ID = _dcm("110153", "Source Role ID")
    DESTINATION_MEDIA = _dcm("110154", "Destination Media")
    SOURCE_MEDIA = _dcm("110155", "Source Media")


class ObjectIDTypeCode:
    """PS3.15 A.5.1.2.4 (RFC 3881 values) and PS3.16 CID 404 "Audit Participant Object ID Type Code"."""

    PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
    URI = Code("12", "RFC-3881", "URI")
    STUDY_INSTANCE_UID = _dcm("110180", "Study Instance UID")
    SOP_CLASS_UID = _dcm("110181", "SOP Class UID")
    NODE_ID = _dcm("110182", "Node ID")


class MediaTypeCode:
    """PS3.16 CID 405 "Media Type Code" (the ones a network gateway uses)."""

    USB_DISK_EMULATION = _dcm("110030", "USB Disk Emulation")
    EMAIL = _dcm("110031", "Email")
    CD = _dcm("110032", "CD")
    DVD = _dcm("110033", "DVD")
    URI = _dcm("110037", "URI")


class Action(enum.StrEnum):
    """EventActionCode."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class Outcome(enum.IntEnum):
    """EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


class NetworkAccessPointType(enum.IntEnum):
    MACHINE_NAME = 1
    IP_ADDRESS = 2
    TELEPHONE_NUMBER = 3
    EMAIL_ADDRESS = 4
    URI = 5


class ObjectType(enum.IntEnum):
    """ParticipantObjectTypeCode."""

    PERSON = 1
    SYSTEM_OBJECT = 2
    ORGANIZATION = 3
    OTHER = 4


class ObjectRole(enum.IntEnum):
    """ParticipantObjectTypeCodeRole (PS3.15 A.5.1.2.2)."""

    PATIENT = 1
    LOCATION = 2
    REPORT = 3
    RESOURCE = 4
    MASTER_FILE = 5
    USER = 6
    LIST = 7
    DOCTOR = 8
    SUBSCRIBER = 9
    GUARANTOR = 10
    SECURITY_USER_ENTITY = 11
    SECURITY_USER_GROUP = 12
    SECURITY_RESOURCE = 13
    SECURITY_GRANULARITY_DEFINITION = 14
    PROVIDER = 15
    DATA_DESTINATION = 16
    DATA_ARCHIVE = 17
    SCHEDULE = 18
    CUSTOMER = 19
    JOB = 20
    JOB_STREAM = 21
    TABLE = 22
    ROUTING_CRITERIA = 23
    QUERY = 24
    DATA_SOURCE = 25
    PROCESSING_ELEMENT = 26


class DataLifeCycle(enum.IntEnum):
    """ParticipantObjectDataLifeCycle (PS3.15 A.5.1.2.3, from RFC 3881)."""

    ORIGINATION = 1
    IMPORT = 2
    AMENDMENT = 3
    VERIFICATION = 4
    TRANSLATION = 5
    ACCESS = 6
    DEIDENTIFICATION = 7
    AGGREGATION = 8
    REPORT = 9
    EXPORT = 10
    DISCLOSURE = 11
    RECEIPT_OF_DISCLOSURE = 12
    ARCHIVING = 13
    LOGICAL_DELETION = 14
    PERMANENT_ERASURE = 15


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


# --------------------------------------------------------------------------- helpers


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


def _now() -> datetime:
    return datetime.now(UTC)


def _role_codes(roles: Iterable[str]) -> tuple[Code, ...]:
    return tuple(Code(role, REALM_ROLE_SCHEME, role) for role in sorted(set(roles)))


def _person(user: UserRef, *, requestor: bool = True, extra_roles: Sequence[Code] = ()) -> ActiveParticipant:
    return ActiveParticipant(
        user_id=user.user_id,
        user_name=user.username,
        is_requestor=requestor,
        network_access_point_id=user.source_address,
        role_id_codes=(*extra_roles, *_role_codes(user.roles)),
        kind=ParticipantKind.PERSON,
    )


def _client(user: UserRef, *, extra_roles: Sequence[Code] = ()) -> ActiveParticipant | None:
    if not user.client_id:
        return None
    return ActiveParticipant(
        user_id=user.client_id,
        is_requestor=False,
        network_access_point_id=user.source_address,
        role_id_codes=(*extra_roles, RoleIDCode.APPLICATION),
        kind=ParticipantKind.CLIENT,
    )


def _person_and_client(user: UserRef, *, roles: Sequence[Code] = ()) -> tuple[ActiveParticipant, ...]:
    """The "(1..2) person and/or process" participants of most A.5.3 tables."""
    client = _client(user, extra_roles=roles)
    person = _person(user, extra_roles=roles)
    return (person,) if client is None else (person, client)


def _gateway(gateway_id: str, *, roles: Sequence[Code] = (), requestor: bool = False) -> ActiveParticipant:
    return ActiveParticipant(
        user_id=gateway_id,
        is_requestor=requestor,
        role_id_codes=tuple(roles),
        kind=ParticipantKind.GATEWAY,
    )


def workflow_participants(user: UserRef | None, gateway_id: str) -> tuple[ActiveParticipant, ...]:
    """The active participants of a workflow step (exports, re-identification): the user (the
    requestor) and their client, then the gateway; or the gateway alone, as the requestor, when a
    worker acts on its own (job steps)."""
    application = (RoleIDCode.APPLICATION,)
    if user is None:
        return (_gateway(gateway_id, roles=application, requestor=True),)
    return (_person(user), *(c for c in (_client(user),) if c is not None), _gateway(gateway_id, roles=application))


def patient_object(patient: PatientRef, *, life_cycle: DataLifeCycle | None = None) -> ParticipantObject:
    """The "Patient" participant object of PS3.15 A.5.3 (e.g. Table A.5.3.6-1)."""
    return ParticipantObject(
        id=patient.patient_id,
        type_code=ObjectType.PERSON,
        type_code_role=ObjectRole.PATIENT,
        id_type_code=ObjectIDTypeCode.PATIENT_NUMBER,
        # CP-2399 makes ParticipantObjectName or ParticipantObjectQuery mandatory: an unknown
        # name is recorded as empty rather than invented.
        name=patient.name or "",
        data_life_cycle=life_cycle,
    )


def study_object(
    study: StudyRef,
    *,
    life_cycle: DataLifeCycle | None = None,
    encrypted: bool | None = None,
    anonymized: bool | None = None,
) -> ParticipantObject:
    """The "Studies" participant object of PS3.15 A.5.3 (Study Instance UID, SOPClass description).

    ParticipantObjectName (mandatory since CP-2399 when there is no query) carries the Study
    Instance UID itself: a study has no other name that is not PHI.
    """
    description = None
    if study.sop_classes or study.accession or encrypted is not None or anonymized is not None:
        description = ObjectDescription(
            accession_numbers=(study.accession,) if study.accession else (),
            sop_classes=tuple(SOPClassRef(uid, int(n)) for uid, n in sorted(study.sop_classes.items())),
            encrypted=encrypted,
            anonymized=anonymized,
        )
    return ParticipantObject(
        id=study.study_uid,
        type_code=ObjectType.SYSTEM_OBJECT,
        type_code_role=ObjectRole.REPORT,
        id_type_code=ObjectIDTypeCode.STUDY_INSTANCE_UID,
        name=study.study_uid,
        data_life_cycle=life_cycle,
        description=description,
    )


def _single_patient(patients: Sequence[PatientRef], table: str) -> tuple[PatientRef, ...]:
    patients = tuple(patients)
    if len(patients) > 1:
        raise ValueError(
            f"PS3.15 {table}: this message shall only include information about a single patient"
        )
    return patients


def _need_studies(studies: Sequence[StudyRef], table: str) -> tuple[StudyRef, ...]:
    studies = tuple(studies)
    if not studies:
        raise ValueError(f"PS3.15 {table}: at least one study is required")
    return studies


def _purposes(purposes: Iterable[str | Code]) -> tuple[Code, ...]:
    return tuple(p if isinstance(p, Code) else Code(p, PURPOSE_OF_USE_SCHEME, p) for p in purposes)


# --------------------------------------------------------------------------- builders


def query_event(
    *,
    user: UserRef,
    gateway_id: str,
    outcome: Outcome,
    query: bytes,
    sop_class_uid: str | None,
    outcome_description: str | None = None,
    patients: Sequence[PatientRef] = (),
    studies: Sequence[StudyRef] = (),
    resource: str | None = None,
    transfer_syntax_uid: str | None = None,
    purpose_of_use: Iterable[str | Code] = (),
    occurred_at: datetime | None = None,
) -> AuditEvent:
    """DCM 110112 Query (PS3.15 A.5.3.10, Table A.5.3.10-1).

    Participants: the process issuing the query (Source Role ID: the client, or the person when no
    client id is known), the process that responds (Destination Role ID: the gateway), and the
    person as the other, requesting participant. Object: "SOP Queried and the Query" with the raw
    query (e.g. the QIDO-RS query string) as ParticipantObjectQuery. A QIDO-RS query names no SOP
    Class; then, as A.5.3.10 Note 2 allows for non-DICOM queries, the object is identified by
    ``resource`` (the request path) with ID type (12, RFC-3881, "URI").

    Patients and studies named by the query (or matched by it) may be added as further objects: an
    extension beyond the table, kept because HIPAA accounting searches by patient.
    """
    client = _client(user, extra_roles=(RoleIDCode.SOURCE_ROLE_ID,))
    if client is None:
        issuers: tuple[ActiveParticipant, ...] = (_person(user, extra_roles=(RoleIDCode.SOURCE_ROLE_ID,)),)
    else:
        issuers = (client, _person(user))
    participants = (*issuers, _gateway(gateway_id, roles=(RoleIDCode.DESTINATION_ROLE_ID,)))
    if sop_class_uid:
        query_id, id_type = sop_class_uid, ObjectIDTypeCode.SOP_CLASS_UID
    else:
        query_id, id_type = resource or "urn:dicomweb:qido-rs", ObjectIDTypeCode.URI
    details = (("TransferSyntax", transfer_syntax_uid.encode("ascii")),) if transfer_syntax_uid else ()
    query_object = ParticipantObject(
        id=query_id,
        type_code=ObjectType.SYSTEM_OBJECT,
        type_code_role=ObjectRole.REPORT,
        id_type_code=id_type,
        query=bytes(query),
        details=details,
    )
    objects = (
        query_object,
        *(patient_object(p) for p in patients),
        *(study_object(s) for s in studies),
    )
    return AuditEvent(
        event_id=EventID.QUERY,
        action=Action.EXECUTE,
        outcome=outcome,
        occurred_at=occurred_at or _now(),
        participants=participants,
        objects=objects,
        outcome_description=outcome_description,
        purpose_of_use=_purposes(purpose_of_use),
    )


def instances_accessed_event(
    *,
    user: UserRef,
    gateway_id: str,
    action: Action,
    outcome: Outcome,
    patients: Sequence[PatientRef],
    studies: Sequence[StudyRef],
    outcome_description: str | None = None,
    event_type_codes: Sequence[Code] = (),
    purpose_of_use: Iterable[str | Code] = (),
    occurred_at: datetime | None = None,
) -> AuditEvent:
    """DCM 110103 DICOM Instances Accessed (PS3.15 A.5.3.6, Table A.5.3.6-1).

    Participants: the person and the client (1..2); the gateway is the audit source, not a
    participant (the table allows only the accessing person and/or process), so ``gateway_id`` is
    accepted for a uniform call shape only. Objects: studies (1..N), the patient (1; a single
    patient per message — more raise ``ValueError``; none is tolerated when the gateway does not
    know it yet). Pass ``EventTypeCode.EMERGENCY_OVERRIDE_STARTED`` etc. in ``event_type_codes`` for
    break-glass access.
    """
    del gateway_id
    patients = _single_patient(patients, "A.5.3.6")
    studies = _need_studies(studies, "A.5.3.6")
    action = Action(action)
    if action not in (Action.CREATE, Action.READ, Action.UPDATE, Action.DELETE):
        raise ValueError("PS3.15 A.5.3.6: EventActionCode is one of C, R, U, D")
    return AuditEvent(
        event_id=EventID.DICOM_INSTANCES_ACCESSED,
        action=action,
        outcome=outcome,
        occurred_at=occurred_at or _now(),
        event_type_codes=tuple(event_type_codes),
        participants=_person_and_client(user),
        objects=(*(study_object(s) for s in studies), *(patient_object(p) for p in patients)),
        outcome_description=outcome_description,
        purpose_of_use=_purposes(purpose_of_use),
    )


def instances_transferred_event(
    *,
    user: UserRef,
    gateway_id: str,
    source_id: str,
    outcome: Outcome,
    patients: Sequence[PatientRef],
    studies: Sequence[StudyRef],
    action: Action = Action.READ,
    destination_id: str | None = None,
    outcome_description: str | None = None,
    event_type_codes: Sequence[Code] = (),
    purpose_of_use: Iterable[str | Code] = (),
    occurred_at: datetime | None = None,
) -> AuditEvent:
    """DCM 110104 DICOM Instances Transferred (PS3.15 A.5.3.7, Table A.5.3.7-1).

    Participants: the process that sent the data (Source Role ID, ``source_id``, e.g. the archive),
    the process that received it (Destination Role ID: ``destination_id`` if given, else the client,
    else the person), and the other participants: the person (the requestor) and the gateway that
    relayed the transfer. Objects: studies (1..N), the patient (single patient per message).
    ``action`` is R for a retrieve (the default), C or U when the receiver stored the instances.
    """
    patients = _single_patient(patients, "A.5.3.7")
    studies = _need_studies(studies, "A.5.3.7")
    action = Action(action)
    if action not in (Action.CREATE, Action.READ, Action.UPDATE):
        raise ValueError("PS3.15 A.5.3.7: EventActionCode is one of C, R, U")
    source = ActiveParticipant(
        user_id=source_id, role_id_codes=(RoleIDCode.SOURCE_ROLE_ID,), kind=ParticipantKind.SOURCE
    )
    participants: list[ActiveParticipant] = [source]
    if destination_id:
        participants.append(
            ActiveParticipant(
                user_id=destination_id,
                role_id_codes=(RoleIDCode.DESTINATION_ROLE_ID,),
                kind=ParticipantKind.DESTINATION,
            )
        )
        participants.extend(_person_and_client(user))
    else:
        client = _client(user, extra_roles=(RoleIDCode.DESTINATION_ROLE_ID,))
        if client is None:
            participants.append(_person(user, extra_roles=(RoleIDCode.DESTINATION_ROLE_ID,)))
        else:
            participants.extend((client, _person(user)))
    if gateway_id not in (source_id, destination_id):
        participants.append(_gateway(gateway_id))
    return AuditEvent(
        event_id=EventID.DICOM_INSTANCES_TRANSFERRED,
        action=action,
        outcome=outcome,
        occurred_at=occurred_at or _now(),
        event_type_codes=tuple(event_type_codes),
        participants=tuple(participants),
        objects=(*(study_object(s) for s in studies), *(patient_object(p) for p in patients)),
        outcome_description=outcome_description,
        purpose_of_use=_purposes(purpose_of_use),
    )


def import_event(
    *,
    user: UserRef,
    gateway_id: str,
    outcome: Outcome,
    patients: Sequence[PatientRef],
    studies: Sequence[StudyRef],
    media_uri: str | None = None,
    media_type: Code = MediaTypeCode.URI,
    outcome_description: str | None = None,
    occurred_at: datetime | None = None,
) -> AuditEvent:
    """DCM 110107 Import (PS3.15 A.5.3.5, Table A.5.3.5-1), e.g. a STOW-RS store.

    Participants: the remote user and process sending the data (Source Role ID; the person is the
    single requestor), the local process importing it (Destination Role ID: the gateway), and the
    media (1): Source Media, ``UserID`` a URI (A.5.2.1, ``media_uri``, default the STOW-RS endpoint
    as seen by the gateway) with MediaType (110037, DCM, "URI"). Objects: studies, patients (1..N).
    """
    participants = (
        *_person_and_client(user, roles=(RoleIDCode.SOURCE_ROLE_ID,)),
        _gateway(gateway_id, roles=(RoleIDCode.DESTINATION_ROLE_ID,)),
        ActiveParticipant(
            user_id=media_uri or f"urn:dicomweb:stow-rs:{gateway_id}",
            role_id_codes=(RoleIDCode.SOURCE_MEDIA,),
            media_type=media_type,
            kind=ParticipantKind.MEDIA,
        ),
    )
    return AuditEvent(
        event_id=EventID.IMPORT,
        action=Action.CREATE,
        outcome=outcome,
        occurred_at=occurred_at or _now(),
        participants=participants,
        objects=(
            *(study_object(s, life_cycle=DataLifeCycle.IMPORT) for s in studies),
            *(patient_object(p) for p in patients),
        ),
        outcome_description=outcome_description,
    )


def export_event(
    *,
    user: UserRef,
    recipient: str,
    purpose: str | Code | Sequence[str | Code],
    patients: Sequence[PatientRef],
    studies: Sequence[StudyRef],
    outcome: Outcome = Outcome.SUCCESS,
    destination_uri: str | None = None,
    media_type: Code = MediaTypeCode.URI,
    anonymized: bool = True,
    outcome_description: str | None = None,
    occurred_at: datetime | None = None,
) -> AuditEvent:
    """DCM 110106 Export (PS3.15 A.5.3.4, Table A.5.3.4-1), e.g. a research bundle download.

    Participants: the remote recipient (Destination Role ID, not the requestor), the local user
    and client exporting (Source Role ID; the person is the single requestor, A.5.3.4.1), and the
    media (1): Destination Media with ``UserID`` = ``destination_uri`` (default ``recipient``) and
    MediaType URI. Objects: studies (0..N, flagged Anonymized for de-identified exports), patients
    (1..N; the source patients, which is what a HIPAA accounting of disclosures needs).
    ``purpose`` becomes PurposeOfUse.
    """
    if not patients:
        raise ValueError("PS3.15 A.5.3.4: at least one patient is required")
    purposes = [purpose] if isinstance(purpose, str | Code) else list(purpose)
    participants = (
        ActiveParticipant(
            user_id=recipient,
            role_id_codes=(RoleIDCode.DESTINATION_ROLE_ID,),
            kind=ParticipantKind.RECIPIENT,
        ),
        *_person_and_client(user, roles=(RoleIDCode.SOURCE_ROLE_ID,)),
        ActiveParticipant(
            user_id=destination_uri or recipient,
            role_id_codes=(RoleIDCode.DESTINATION_MEDIA,),
            media_type=media_type,
            kind=ParticipantKind.MEDIA,
        ),
    )
    return AuditEvent(
        event_id=EventID.EXPORT,
        action=Action.READ,
        outcome=outcome,
        occurred_at=occurred_at or _now(),
        participants=participants,
        objects=(
            *(study_object(s, life_cycle=DataLifeCycle.EXPORT, anonymized=anonymized) for s in studies),
            *(patient_object(p) for p in patients),
        ),
        outcome_description=outcome_description,
        purpose_of_use=_purposes(purposes),
    )


def study_deleted_event(
    *,
    user: UserRef,
    gateway_id: str,
    outcome: Outcome,
    patients: Sequence[PatientRef],
    studies: Sequence[StudyRef],
    life_cycle: DataLifeCycle = DataLifeCycle.LOGICAL_DELETION,
    outcome_description: str | None = None,
    occurred_at: datetime | None = None,
) -> AuditEvent:
    """DCM 110105 DICOM Study Deleted (PS3.15 A.5.3.8, Table A.5.3.8-1).

    Participants: the person and client deleting (1..2). Objects: studies being deleted (1..N) with
    ``life_cycle`` — 14 logical deletion by default, ``DataLifeCycle.PERMANENT_ERASURE`` (15) for
    crypto-shredding — and the patient (single patient per message).
    """
    del gateway_id
    patients = _single_patient(patients, "A.5.3.8")
    studies = _need_studies(studies, "A.5.3.8")
    return AuditEvent(
        event_id=EventID.DICOM_STUDY_DELETED,
        action=Action.DELETE,
        outcome=outcome,
        occurred_at=occurred_at or _now(),
        participants=_person_and_client(user),
        objects=(
            *(study_object(s, life_cycle=life_cycle) for s in studies),
            *(patient_object(p, life_cycle=life_cycle) for p in patients),
        ),
        outcome_description=outcome_description,
    )


def security_alert_event(
    *,
    user: UserRef | None,
    gateway_id: str,
    alert_type: Code,
    description: str,
    resource: str,
    outcome: Outcome = Outcome.MINOR_FAILURE,
    source_address: str | None = None,
    alternative_user_id: str | None = None,
    patients: Sequence[PatientRef] = (),
    studies: Sequence[StudyRef] = (),
    occurred_at: datetime | None = None,
) -> AuditEvent:
    """DCM 110113 Security Alert (PS3.15 A.5.3.11, Table A.5.3.11-1), e.g. a denial or a bad token.

    EventTypeCode is ``alert_type`` (CID 403, e.g. ``EventTypeCode.ACCESS_CONTROL_DECISION``,
    ``AUTHENTICATION_DECISION``, ``USE_OF_RESTRICTED_FUNCTION``); ``description`` goes to
    EventOutcomeDescription. Outcome: 4/8 mean mitigation worked (a refused request), 12 that the
    system may be compromised. Participants: the reporting process (the gateway, which initiates the
    report) and the performing persons/processes (UserIsRequestor shall be false): the user and
    client, or — when the token was refused and nobody is verified — a participant with UserID
    ``"unauthenticated"``, the caller's address as NetworkAccessPointID and the caller's claim
    (``alternative_user_id``) as AlternativeUserID prefixed ``"unverified:"``. Alert subjects: the
    resource (URI) with the description as an "Alert Description" detail, plus any patient/study.
    """
    participants: list[ActiveParticipant] = [_gateway(gateway_id, requestor=True)]
    if user is not None:
        participants.append(_person(user, requestor=False))
        client = _client(user)
        if client is not None:
            participants.append(client)
    else:
        participants.append(
            ActiveParticipant(
                user_id=UNAUTHENTICATED_USER_ID,
                alternative_user_id=(UNVERIFIED_PREFIX + alternative_user_id)
                if alternative_user_id
                else None,
                network_access_point_id=source_address,
                kind=ParticipantKind.UNVERIFIED,
            )
        )
    subject = ParticipantObject(
        id=resource,
        type_code=ObjectType.SYSTEM_OBJECT,
        type_code_role=ObjectRole.RESOURCE,
        id_type_code=ObjectIDTypeCode.URI,
        name=resource,
        details=(("Alert Description", description.encode("utf-8", "replace")),),
    )
    return AuditEvent(
        event_id=EventID.SECURITY_ALERT,
        action=Action.EXECUTE,
        outcome=outcome,
        occurred_at=occurred_at or _now(),
        event_type_codes=(alert_type,),
        participants=tuple(participants),
        objects=(subject, *(patient_object(p) for p in patients), *(study_object(s) for s in studies)),
        outcome_description=description,
    )


def authentication_event(
    *,
    user: UserRef,
    gateway_id: str,
    outcome: Outcome,
    event_type: Code = EventTypeCode.LOGIN,
    authenticator_id: str | None = None,
    outcome_description: str | None = None,
    occurred_at: datetime | None = None,
) -> AuditEvent:
    """DCM 110114 User Authentication (PS3.15 A.5.3.12, Table A.5.3.12-1).

    ``event_type`` is Login (110122) or Logout (110123). Participants: the person authenticated or
    claimed (1, the requestor, with the network access point the table makes mandatory — pass
    ``user.source_address``), and the node performing authentication (0..1: ``authenticator_id``,
    e.g. the Keycloak realm URL, else the gateway). No participant objects.
    """
    if event_type not in (EventTypeCode.LOGIN, EventTypeCode.LOGOUT):
        raise ValueError("PS3.15 A.5.3.12: EventTypeCode is Login (110122) or Logout (110123)")
    participants = (_person(user), _gateway(authenticator_id or gateway_id))
    return AuditEvent(
        event_id=EventID.USER_AUTHENTICATION,
        action=Action.EXECUTE,
        outcome=outcome,
        occurred_at=occurred_at or _now(),
        event_type_codes=(event_type,),
        participants=participants,
        outcome_description=outcome_description,
    )


def application_activity_event(
    activity: Literal["start", "stop"],
    *,
    gateway_id: str,
    outcome: Outcome = Outcome.SUCCESS,
    launcher: UserRef | None = None,
    process_id: str | None = None,
    host: str | None = None,
    outcome_description: str | None = None,
    occurred_at: datetime | None = None,
) -> AuditEvent:
    """DCM 110100 Application Activity (PS3.15 A.5.3.1, Table A.5.3.1-1).

    EventTypeCode Application Start (110120) or Stop (110121). Participants: the application
    (1, RoleIDCode 110150 "Application", ``process_id`` as AlternativeUserID) and the persons or
    processes that started it (0..N, RoleIDCode 110151 "Application Launcher", the requestor).
    No participant objects.
    """
    type_code = {"start": EventTypeCode.APPLICATION_START, "stop": EventTypeCode.APPLICATION_STOP}[activity]
    application = ActiveParticipant(
        user_id=gateway_id,
        alternative_user_id=process_id,
        is_requestor=launcher is None,
        network_access_point_id=host,
        role_id_codes=(RoleIDCode.APPLICATION,),
        kind=ParticipantKind.GATEWAY,
    )
    participants: tuple[ActiveParticipant, ...] = (application,)
    if launcher is not None:
        participants += (_person(launcher, extra_roles=(RoleIDCode.APPLICATION_LAUNCHER,)),)
    return AuditEvent(
        event_id=EventID.APPLICATION_ACTIVITY,
        action=Action.EXECUTE,
        outcome=outcome,
        occurred_at=occurred_at or _now(),
        event_type_codes=(type_code,),
        participants=participants,
        outcome_description=outcome_description,
    )


def audit_log_used_event(
    *,
    user: UserRef,
    gateway_id: str,
    outcome: Outcome,
    audit_log_uri: str,
    query: bytes | None = None,
    outcome_description: str | None = None,
    occurred_at: datetime | None = None,
) -> AuditEvent:
    """DCM 110101 Audit Log Used (PS3.15 A.5.3.2, Table A.5.3.2-1), e.g. a privacy officer's search.

    Participants: the person and client reading the log (1..2). Object: the audit log (1): type 2,
    role 13 Security Resource, ID type (12, RFC-3881, "URI"), ID = ``audit_log_uri``, name
    "Security Audit Log". The search itself, when given, is kept as a "Query" detail (the name is
    mandated, and name and query are exclusive since CP-2399).
    """
    del gateway_id
    log = ParticipantObject(
        id=audit_log_uri,
        type_code=ObjectType.SYSTEM_OBJECT,
        type_code_role=ObjectRole.SECURITY_RESOURCE,
        id_type_code=ObjectIDTypeCode.URI,
        name="Security Audit Log",
        details=(("Query", bytes(query)),) if query else (),
    )
    return AuditEvent(
        event_id=EventID.AUDIT_LOG_USED,
        action=Action.READ,
        outcome=outcome,
        occurred_at=occurred_at or _now(),
        participants=_person_and_client(user),
        objects=(log,),
        outcome_description=outcome_description,
    )
