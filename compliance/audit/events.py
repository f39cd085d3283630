"""The builders of audit events: one function for each table of PS3.15 A.5.3 (2024d edition).

Callers should not assemble the message model (:mod:`compliance.audit.message`) by hand: each
builder below follows one table, so the participants, role codes and object type codes the standard
requires are always present. Code values: :mod:`compliance.audit.codes` (PS3.16 CID 400-405 and
RFC 3881 object ID type codes "2 Patient Number" and "12 URI", as PS3.15 A.5.1.2.4 lists them).

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

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Literal

from compliance.audit.codes import (
    PURPOSE_OF_USE_SCHEME,
    REALM_ROLE_SCHEME,
    Action,
    Code,
    DataLifeCycle,
    EventID,
    EventTypeCode,
    MediaTypeCode,
    ObjectIDTypeCode,
    ObjectRole,
    ObjectType,
    Outcome,
    RoleIDCode,
)
from compliance.audit.message import (
    UNAUTHENTICATED_USER_ID,
    UNVERIFIED_PREFIX,
    ActiveParticipant,
    AuditEvent,
    ObjectDescription,
    ParticipantKind,
    ParticipantObject,
    PatientRef,
    SOPClassRef,
    StudyRef,
    UserRef,
)

__all__ = [
    "application_activity_event",
    "audit_log_used_event",
    "authentication_event",
    "export_event",
    "import_event",
    "instances_accessed_event",
    "instances_transferred_event",
    "patient_object",
    "query_event",
    "security_alert_event",
    "study_deleted_event",
    "study_object",
    "workflow_participants",
]


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


def _event(
    event_id: EventID,
    action: Action,
    outcome: Outcome,
    occurred_at: datetime | None,
    participants: Iterable[ActiveParticipant],
    *,
    objects: Iterable[ParticipantObject] = (),
    event_type_codes: Iterable[Code] = (),
    outcome_description: str | None = None,
    purpose_of_use: Iterable[str | Code] = (),
) -> AuditEvent:
    """The ending every builder shares: the event at ``occurred_at`` (default now), purposes of use
    given as plain strings coded in :data:`~compliance.audit.codes.PURPOSE_OF_USE_SCHEME`."""
    return AuditEvent(
        event_id=event_id,
        action=action,
        outcome=outcome,
        occurred_at=occurred_at or _now(),
        event_type_codes=tuple(event_type_codes),
        participants=tuple(participants),
        objects=tuple(objects),
        outcome_description=outcome_description,
        purpose_of_use=_purposes(purpose_of_use),
    )


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
    return _event(
        EventID.QUERY,
        Action.EXECUTE,
        outcome,
        occurred_at,
        participants,
        objects=objects,
        outcome_description=outcome_description,
        purpose_of_use=purpose_of_use,
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
    return _event(
        EventID.DICOM_INSTANCES_ACCESSED,
        action,
        outcome,
        occurred_at,
        _person_and_client(user),
        objects=(*(study_object(s) for s in studies), *(patient_object(p) for p in patients)),
        event_type_codes=event_type_codes,
        outcome_description=outcome_description,
        purpose_of_use=purpose_of_use,
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
    return _event(
        EventID.DICOM_INSTANCES_TRANSFERRED,
        action,
        outcome,
        occurred_at,
        participants,
        objects=(*(study_object(s) for s in studies), *(patient_object(p) for p in patients)),
        event_type_codes=event_type_codes,
        outcome_description=outcome_description,
        purpose_of_use=purpose_of_use,
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
    return _event(
        EventID.IMPORT,
        Action.CREATE,
        outcome,
        occurred_at,
        participants,
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
    return _event(
        EventID.EXPORT,
        Action.READ,
        outcome,
        occurred_at,
        participants,
        objects=(
            *(study_object(s, life_cycle=DataLifeCycle.EXPORT, anonymized=anonymized) for s in studies),
            *(patient_object(p) for p in patients),
        ),
        outcome_description=outcome_description,
        purpose_of_use=purposes,
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
    return _event(
        EventID.DICOM_STUDY_DELETED,
        Action.DELETE,
        outcome,
        occurred_at,
        _person_and_client(user),
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
    return _event(
        EventID.SECURITY_ALERT,
        Action.EXECUTE,
        outcome,
        occurred_at,
        participants,
        objects=(subject, *(patient_object(p) for p in patients), *(study_object(s) for s in studies)),
        event_type_codes=(alert_type,),
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
    return _event(
        EventID.USER_AUTHENTICATION,
        Action.EXECUTE,
        outcome,
        occurred_at,
        participants,
        event_type_codes=(event_type,),
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
    return _event(
        EventID.APPLICATION_ACTIVITY,
        Action.EXECUTE,
        outcome,
        occurred_at,
        participants,
        event_type_codes=(type_code,),
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
    return _event(
        EventID.AUDIT_LOG_USED,
        Action.READ,
        outcome,
        occurred_at,
        _person_and_client(user),
        objects=(log,),
        outcome_description=outcome_description,
    )
