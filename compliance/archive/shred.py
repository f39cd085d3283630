"""Crypto-shred requests: one administrator asks, a different one approves, a legal hold refuses.

A shred cannot be undone, so no administrator performs one alone. Every entry point (``POST
/api/v1/keys/shred-requests...`` in :mod:`compliance.api.keys`, ``compliance shred ...`` in
:mod:`compliance.archive.cli`) goes through :class:`ShredRequests`, the only caller of
:meth:`compliance.archive.operations.KeyOperations.execute_shred`. One request moves through::

    (legal hold on the patient: refused, no request is created)
        │
        v
    requested ──approve (a DIFFERENT administrator; no legal hold)──> approved ──(the shred ran)──> shredded
        │              │                                                 │  ^
        │              └─ by the requester, or under a legal hold:       └──┘ execute: the shred failed or its
        │                 refused, the request stays requested                outcome is unknown; run it again
        └──reject (any administrator, the requester included: a withdrawal)──> rejected

``approve`` executes the shred at once; the request becomes ``shredded`` when the custodian has
destroyed the key and the patient has left the archive's index. If the archive fails half-way the
request stays ``approved`` and ``execute`` (any administrator: two have agreed already) runs the
idempotent shred again. At most one request per patient is open (requested or approved).

Two-person rule: the approver differs from the requester by user id (the token's ``sub``, or
``os:<account>`` for the CLI) *and* by name, compared without the ``os:`` prefix and case, so the
Keycloak user ``ada`` cannot approve what the operating-system account ``ada`` asked for. The
schema keeps the id half too (``compliance.archive.models``).

Legal holds: ``legal_holds[].patient_ids`` of the retention policy
(:class:`compliance.audit.retention.RetentionPolicy`, the file ``compliance audit prune`` reads),
read again at every request, approval and execution, so a hold takes effect without a restart. A
policy that cannot be read refuses the shred (fail closed). Month holds concern the audit trail only.

Audit (PS3.15 A.5.3.11, 110113 Security Alert, the request as ``urn:compliance:shred-request:<id>``,
the patient named): each step (asked, approved, rejected) with event type 110129 Security
Configuration, outcome 0; each refusal (self-approval, legal hold, unreadable holds) with 110147
Access Control Decision, outcome 4; the execution as :class:`KeyOperations` records it (the attempt,
then 110105 DICOM Study Deleted with permanent erasure). A step's event is recorded before the
answer; if it cannot be, the step is undone and refused.

Errors (subclasses of ``compliance.errors``)::

    PermissionDenied
    └── SelfApprovalRefused      the requester tried to approve their own shred request     -> 403
    NotFound
    └── ShredRequestNotFound     no such shred request                                       -> 404
    Conflict
    ├── ShredStateConflict       not in a state that allows it, or the patient already has   -> 409
    │                            an open request
    └── LegalHoldRefused         a legal hold names the patient                              -> 409
    InvalidRequest               a missing reason or rejection comment, a malformed PatientID -> 400
    ConfigurationError           the retention policy (the legal holds) cannot be read        -> 500
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError as SqlIntegrityError
from sqlalchemy.orm import Session, sessionmaker

from compliance.archive.models import SHRED_STATES, ShredRequest
from compliance.archive.operations import SHRED_REQUEST_URN, ApprovedShred, KeyOperations
from compliance.audit.codes import EventTypeCode, Outcome
from compliance.audit.events import security_alert_event
from compliance.audit.message import PatientRef, UserRef
from compliance.audit.recorder import AuditRecorder
from compliance.audit.retention import RetentionPolicy
from compliance.db.session import rows_matched
from compliance.errors import (
    ComplianceError,
    ConfigurationError,
    Conflict,
    InvalidRequest,
    NotFound,
    PermissionDenied,
)

__all__ = ["LegalHoldRefused", "SelfApprovalRefused", "ShredRequestNotFound", "ShredRequests",
           "ShredStateConflict"]

MAX_TEXT = 1024
#: PatientID is a DICOM LO: at most 64 characters, no control characters, no backslash.
MAX_PATIENT_ID = 64


class SelfApprovalRefused(PermissionDenied):
    code = "self_approval_refused"


class ShredRequestNotFound(NotFound):
    code = "shred_request_not_found"


class ShredStateConflict(Conflict):
    code = "shred_request_state_conflict"


class LegalHoldRefused(Conflict):
    code = "legal_hold"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _name(user: UserRef) -> str:
    return user.username or user.user_id


def _person_key(name: str) -> str:
    return name.removeprefix("os:").casefold()


def same_person(row: ShredRequest, user: UserRef) -> bool:
    """Whether ``user`` is the requester of ``row`` (by user id, or by name across the API and the CLI)."""
    return row.requested_by == user.user_id or _person_key(row.requested_by_name) == _person_key(_name(user))


def _patient_id(value: str) -> str:
    if not value or len(value) > MAX_PATIENT_ID or value != value.strip(" ") or "\\" in value or any(
            ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise InvalidRequest(f"a PatientID of 1 to {MAX_PATIENT_ID} characters, without control characters, "
                             "backslash or surrounding spaces, is required")
    return value


def _text(value: str | None, what: str, *, required: bool) -> str:
    value = (value or "").strip()
    if required and not value:
        raise InvalidRequest(f"a {what} is required")
    if len(value) > MAX_TEXT:
        raise InvalidRequest(f"the {what} is longer than {MAX_TEXT} characters")
    return value


class ShredRequests:
    """The two-person shred: requests in the gateway's database, the shred through :class:`KeyOperations`."""

    def __init__(self, sessions: sessionmaker[Session], operations: KeyOperations, auditor: AuditRecorder, *,
                 gateway_id: str, retention_policy_file: Path,
                 clock: Callable[[], datetime] = _utcnow) -> None:
        self._sessions = sessions
        self._ops = operations
        self._auditor = auditor
        self._gateway_id = gateway_id
        self._policy_file = retention_policy_file
        self._clock = clock

    # ------------------------------------------------------------------ reading
    @staticmethod
    def as_json(row: ShredRequest) -> dict[str, Any]:
        """The request as the API and the CLI show it."""
        return {"id": row.id, "state": row.state, "patient_id": row.patient_id, "reason": row.reason,
                "requested_by": {"id": row.requested_by, "username": row.requested_by_name},
                "requested_at": _iso(row.requested_at),
                "decided_by": {"id": row.decided_by, "username": row.decided_by_name} if row.decided_by else None,
                "decided_at": _iso(row.decided_at), "comment": row.comment, "executed_at": _iso(row.executed_at)}

    def _row(self, request_id: str) -> ShredRequest:
        with self._sessions() as session:
            row = session.get(ShredRequest, request_id)
        if row is None:
            raise ShredRequestNotFound("no such shred request")
        return row

    async def get(self, request_id: str) -> dict[str, Any]:
        return self.as_json(await asyncio.to_thread(self._row, request_id))

    async def list_requests(self, state: str | None = "requested", *, limit: int = 500) -> list[dict[str, Any]]:
        """Requests in ``state`` (``None``: every state), the newest first."""
        if state is not None and state not in SHRED_STATES:
            raise InvalidRequest(f"state must be one of {[*SHRED_STATES, 'all']}")

        def read() -> list[ShredRequest]:
            query = select(ShredRequest).order_by(ShredRequest.requested_at.desc()).limit(limit)
            if state is not None:
                query = query.where(ShredRequest.state == state)
            with self._sessions() as session:
                return list(session.scalars(query))

        return [self.as_json(r) for r in await asyncio.to_thread(read)]

    # ------------------------------------------------------------------ audit
    async def _alert(self, user: UserRef, description: str, *, resource: str, patient_id: str,
                     refused: bool) -> None:
        await self._auditor.record(security_alert_event(
            user=user, gateway_id=self._gateway_id,
            alert_type=EventTypeCode.ACCESS_CONTROL_DECISION if refused else EventTypeCode.SECURITY_CONFIGURATION,
            description=description[:MAX_TEXT], resource=resource,
            outcome=Outcome.MINOR_FAILURE if refused else Outcome.SUCCESS, source_address=user.source_address,
            patients=(PatientRef(patient_id=patient_id),)))

    async def _refuse_under_hold(self, user: UserRef, patient_id: str, what: str, resource: str) -> None:
        """Raise :class:`LegalHoldRefused` (audited) when a legal hold names the patient."""
        try:
            policy = await asyncio.to_thread(RetentionPolicy.from_file, self._policy_file)
        except Exception as exc:  # a malformed file may raise more than ConfigurationError
            message = exc.message if isinstance(exc, ComplianceError) else f"{type(exc).__name__}: {exc}"
            await self._alert(user, f"refused: {what}: the legal holds cannot be read ({message}); no shred "
                                    "while they cannot be checked", resource=resource, patient_id=patient_id,
                              refused=True)
            if isinstance(exc, ComplianceError):
                raise
            raise ConfigurationError(f"the legal holds cannot be read: {message}") from exc
        holds = [h for h in policy.holds if patient_id in h.patient_ids]
        if holds:
            named = ", ".join(h.id + (f" ({h.reason})" if h.reason else "") for h in holds)
            await self._alert(user, f"refused: {what}: the patient is under legal hold {named}",
                              resource=resource, patient_id=patient_id, refused=True)
            raise LegalHoldRefused(f"the patient is under legal hold {', '.join(h.id for h in holds)}: "
                                   "it cannot be shredded while the hold lasts",
                                   detail={"legal_holds": [h.id for h in holds]})

    # ------------------------------------------------------------------ the steps
    async def request(self, user: UserRef, patient_id: str, reason: str) -> dict[str, Any]:
        patient_id = _patient_id(patient_id)
        reason = _text(reason, "reason", required=True)
        await self._refuse_under_hold(user, patient_id, "a crypto-shred request", SHRED_REQUEST_URN.rstrip(":"))
        row = ShredRequest(id=str(uuid.uuid4()), patient_id=patient_id, reason=reason, state="requested",
                           requested_by=user.user_id, requested_by_name=_name(user), requested_at=self._clock())

        def insert() -> None:
            try:
                with self._sessions() as session, session.begin():
                    session.add(row)
            except SqlIntegrityError as exc:
                with self._sessions() as session:
                    open_id = session.scalar(select(ShredRequest.id).where(
                        ShredRequest.patient_id == patient_id, ShredRequest.state.in_(("requested", "approved"))))
                raise ShredStateConflict("the patient already has an open shred request",
                                         detail={"open_request": open_id}) from exc

        await asyncio.to_thread(insert)
        try:
            await self._alert(user, f"crypto-shred request {row.id}: asked by {row.requested_by_name} for patient "
                                    f"{patient_id}, reason: {reason}; awaiting approval by a second, different "
                                    "administrator", resource=SHRED_REQUEST_URN + row.id, patient_id=patient_id,
                              refused=False)
        except BaseException:
            await asyncio.to_thread(self._delete_unaudited, row.id)
            raise
        return self.as_json(row)

    def _delete_unaudited(self, request_id: str) -> None:
        with self._sessions() as session, session.begin():
            session.execute(delete(ShredRequest).where(ShredRequest.id == request_id,
                                                       ShredRequest.state == "requested"))

    async def _decide(self, request_id: str, user: UserRef, *, approve: bool, comment: str) -> ShredRequest:
        row = await asyncio.to_thread(self._row, request_id)
        resource = SHRED_REQUEST_URN + request_id
        if approve and same_person(row, user):
            await self._alert(user, f"refused: crypto-shred request {request_id} was asked by "
                                    f"{row.requested_by_name}; its approval needs a second, different administrator",
                              resource=resource, patient_id=row.patient_id, refused=True)
            raise SelfApprovalRefused("a shred needs the approval of a second, different administrator")
        if row.state != "requested":
            raise ShredStateConflict(f"the shred request is {row.state}, not requested", detail={"state": row.state})
        if approve:
            await self._refuse_under_hold(user, row.patient_id, f"approval of crypto-shred request {request_id}",
                                          resource)
        new_state = "approved" if approve else "rejected"

        def decide() -> int:
            query = update(ShredRequest).where(ShredRequest.id == request_id, ShredRequest.state == "requested")
            if approve:
                query = query.where(ShredRequest.requested_by != user.user_id)
            with self._sessions() as session, session.begin():
                return rows_matched(session.execute(query.values(
                    state=new_state, decided_by=user.user_id, decided_by_name=_name(user), decided_at=self._clock(),
                    comment=comment or None)))

        if not await asyncio.to_thread(decide):
            state = (await asyncio.to_thread(self._row, request_id)).state
            raise ShredStateConflict(f"the shred request is {state}, not requested", detail={"state": state})
        verb = "approved" if approve else "rejected"
        try:
            await self._alert(user, f"crypto-shred request {request_id}: {verb} by {_name(user)} (asked by "
                                    f"{row.requested_by_name})" + (f", comment: {comment}" if comment else "")
                                    + ("; the shred follows" if approve else "; nothing is shredded"),
                              resource=resource, patient_id=row.patient_id, refused=False)
        except BaseException:
            await asyncio.to_thread(self._undecide, request_id, new_state)
            raise
        return await asyncio.to_thread(self._row, request_id)

    def _undecide(self, request_id: str, state: str) -> None:
        with self._sessions() as session, session.begin():
            session.execute(update(ShredRequest).where(ShredRequest.id == request_id, ShredRequest.state == state)
                            .values(state="requested", decided_by=None, decided_by_name=None, decided_at=None,
                                    comment=None))

    async def approve(self, request_id: str, user: UserRef, comment: str = "") -> dict[str, Any]:
        """A second administrator approves; the shred runs at once (see :meth:`execute`)."""
        row = await self._decide(request_id, user, approve=True, comment=_text(comment, "comment", required=False))
        return await self._execute(row, user)

    async def reject(self, request_id: str, user: UserRef, comment: str) -> dict[str, Any]:
        row = await self._decide(request_id, user, approve=False, comment=_text(comment, "comment", required=True))
        return self.as_json(row)

    async def execute(self, request_id: str, user: UserRef) -> dict[str, Any]:
        """Run the shred of an approved request again (its first run failed or its outcome is unknown)."""
        row = await asyncio.to_thread(self._row, request_id)
        if row.state != "approved":
            raise ShredStateConflict(f"the shred request is {row.state}; only an approved request is executed",
                                     detail={"state": row.state})
        await self._refuse_under_hold(user, row.patient_id, f"execution of crypto-shred request {request_id}",
                                      SHRED_REQUEST_URN + request_id)
        return await self._execute(row, user)

    async def _execute(self, row: ShredRequest, user: UserRef) -> dict[str, Any]:
        approved = ApprovedShred(request_id=row.id, requested_by=row.requested_by_name,
                                 approved_by=row.decided_by_name or "?")
        try:
            result = await self._ops.execute_shred(row.patient_id, user, approved)
        except ComplianceError as exc:
            exc.detail = {**exc.detail, "shred_request": row.id, "state": "approved"}
            raise

        def done() -> ShredRequest:
            with self._sessions() as session, session.begin():
                session.execute(update(ShredRequest).where(ShredRequest.id == row.id,
                                                           ShredRequest.state == "approved")
                                .values(state="shredded", executed_at=self._clock()))
            return self._row(row.id)

        return {**self.as_json(await asyncio.to_thread(done)), "shred": result}
