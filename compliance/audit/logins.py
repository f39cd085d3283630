"""Logins at the identity provider, in the audit trail: Keycloak's login events as 110114 User Authentication.

Users and applications authenticate at Keycloak, not at the gateway: the gateway only sees the
tokens that result (and records a 110113 when it refuses one). So that the trail also answers "who
logged in, who failed to, from where" (HIPAA audit controls; the failed-authentication burst
detection), ``compliance audit import-logins`` copies Keycloak's own login events into the outbox.
It is a batch job, for cron next to ``compliance audit detect``, like the detections and for the same
reason: the gateway runs one process per core, a batch job runs once.

What is imported (the realm stores these event types, ``deploy/keycloak/imaging-realm.json``):

=====================================  ====================  ==========================
Keycloak event                         EventTypeCode         EventOutcomeIndicator
=====================================  ====================  ==========================
``LOGIN``, ``CLIENT_LOGIN``            110122 Login          0 success
``LOGIN_ERROR``, ``CLIENT_LOGIN_ERROR``  110122 Login          4 minor failure (refused)
``LOGOUT``                             110123 Logout         0 success
``LOGOUT_ERROR``                       110123 Logout         4 minor failure
=====================================  ====================  ==========================

Token refreshes and code exchanges are not logins and are left in Keycloak's log.

Each event names the account (Keycloak's user id and user name; for a login refused before an
account was found, ``unverified:<the name typed>``), the source address Keycloak saw, Keycloak's
realm as the authenticating node, and, in EventOutcomeDescription, the client, the grant and
Keycloak's error code. The event's uuid is derived from Keycloak's event id (UUID v5), so importing
the same Keycloak event twice records it once: events already in the outbox are skipped.

Where an import run starts: a cursor per realm (``audit_import_cursor``: the time of the newest event
imported), read back ``OVERLAP`` earlier so that an event Keycloak stored late (another node, a slow
transaction) is not missed; the uuids make the overlap harmless. The first run starts
``first_lookback`` ago. Keycloak keeps events for ``eventsExpiration`` (7 days in the demo realm):
run the import more often than that, or events are gone before they are copied (the run says how
far back it started).

The job reads Keycloak's admin API with the gateway's confidential client (service account with
realm-management ``view-events``; it cannot change anything).
"""

from __future__ import annotations

import uuid as uuid_module
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError

from compliance.audit.codes import Code, EventTypeCode, Outcome
from compliance.audit.events import authentication_event
from compliance.audit.message import AuditEvent, UserRef
from compliance.audit.models import AuditImportCursor, AuditOutboxRow
from compliance.audit.recorder import AuditRecorder
from compliance.audit.transactions import audit_transaction
from compliance.auth.service_account import ServiceAccountAdmin
from compliance.db.base import table_of
from compliance.errors import AuditFailure, UpstreamUnavailable

__all__ = ["IMPORTED_TYPES", "KeycloakEvents", "LoginImport", "LoginImportResult", "event_from_keycloak",
           "refused_logins_query"]

#: Keycloak event type -> (EventTypeCode, outcome).
IMPORTED_TYPES: Mapping[str, tuple[Code, Outcome]] = {
    "LOGIN": (EventTypeCode.LOGIN, Outcome.SUCCESS),
    "CLIENT_LOGIN": (EventTypeCode.LOGIN, Outcome.SUCCESS),
    "LOGIN_ERROR": (EventTypeCode.LOGIN, Outcome.MINOR_FAILURE),
    "CLIENT_LOGIN_ERROR": (EventTypeCode.LOGIN, Outcome.MINOR_FAILURE),
    "LOGOUT": (EventTypeCode.LOGOUT, Outcome.SUCCESS),
    "LOGOUT_ERROR": (EventTypeCode.LOGOUT, Outcome.MINOR_FAILURE),
}

#: How far before the cursor each run reads again (events stored late are not missed).
OVERLAP = timedelta(minutes=5)
#: Keycloak's admin API returns events a page at a time.
PAGE = 500
_NAMESPACE = uuid_module.UUID("6f1c1d2e-6a3b-5c4d-9e8f-0a1b2c3d4e5f")


#: Keycloak event types that are refused logins (counted by the burst detection, listed by the
#: security report).
REFUSED_LOGIN_TYPES = ("LOGIN_ERROR", "CLIENT_LOGIN_ERROR")


def refused_logins_query() -> dict[str, Any]:
    """An Elasticsearch filter for the refused logins imported from Keycloak, one per Keycloak event.

    A refused ``compliance token`` login is also recorded by the CLI itself (``record_cli_authentication``);
    Keycloak's event of the same login is the one that counts, so nothing is counted twice. The
    imported events are told by the description this module gives them (``Keycloak <TYPE>...``).
    """
    return {"bool": {
        "filter": [{"term": {"event.id": "110114"}}],
        "must_not": [{"term": {"event.outcome": int(Outcome.SUCCESS)}}],
        "should": [{"prefix": {"event.outcome_description.keyword": f"Keycloak {kind}"}}
                   for kind in REFUSED_LOGIN_TYPES],
        "minimum_should_match": 1}}


def event_uuid(realm_url: str, keycloak_event_id: str) -> str:
    """The audit event's uuid for one Keycloak event: the same Keycloak event always maps to it."""
    return str(uuid_module.uuid5(_NAMESPACE, f"{realm_url}#{keycloak_event_id}"))


def _text(value: Any, limit: int = 256) -> str | None:
    if value is None or value == "":
        return None
    return str(value)[:limit]


def event_from_keycloak(kc: Mapping[str, Any], *, realm_url: str, gateway_id: str) -> AuditEvent | None:
    """The 110114 event of one Keycloak event (its admin API representation); None for other types
    or for an event without the id and time it needs (nothing can be derived from it reliably)."""
    kind = IMPORTED_TYPES.get(str(kc.get("type") or ""))
    kc_id, when = kc.get("id"), kc.get("time")
    if kind is None or not kc_id or not isinstance(when, int | float) or isinstance(when, bool):
        return None
    raw_details = kc.get("details")
    details: Mapping[str, Any] = raw_details if isinstance(raw_details, Mapping) else {}
    username = _text(details.get("username"))
    user_id = _text(kc.get("userId"), 64)
    client = _text(kc.get("clientId"))
    if user_id is None:  # refused before an account was found: only the typed name is known
        user_id = f"unverified:{username}" if username else "unknown"
    described = [f"Keycloak {kc.get('type')}"]
    if client:
        described.append(f"client {client}")
    for key in ("grant_type", "auth_method"):
        if details.get(key):
            described.append(f"{key.replace('_', ' ')} {_text(details[key], 64)}")
    outcome_description = ", ".join(described)
    if kc.get("error"):
        outcome_description += f": {_text(kc['error'], 128)}"
    user = UserRef(user_id=user_id, username=username, client_id=client, source_address=_text(kc.get("ipAddress"), 64))
    event = authentication_event(
        user=user,
        gateway_id=gateway_id, outcome=kind[1], event_type=kind[0], authenticator_id=realm_url,
        outcome_description=outcome_description,
        occurred_at=datetime.fromtimestamp(when / 1000, tz=UTC))
    return replace(event, uuid=event_uuid(realm_url, str(kc_id)))


class KeycloakEvents(Protocol):
    """Reads a realm's login events in time order (``compliance.audit.logins.KeycloakAdminEvents``)."""

    def read(self, since: datetime, *, types: Sequence[str], first: int, limit: int) -> list[dict[str, Any]]: ...


class KeycloakAdminEvents:
    """Keycloak's ``GET /admin/realms/{realm}/events`` through python-keycloak, as the gateway's
    confidential client (service account with realm-management ``view-events``)."""

    def __init__(self, server_url: str, realm: str, *, client_id: str, client_secret: str) -> None:
        self._admin = ServiceAccountAdmin(server_url, realm, client_id=client_id, client_secret=client_secret)

    def read(self, since: datetime, *, types: Sequence[str], first: int, limit: int) -> list[dict[str, Any]]:
        try:
            events = self._admin.client().get_events({
                "type": list(types), "dateFrom": str(int(since.timestamp() * 1000)), "direction": "asc",
                "first": first, "max": limit})
        except Exception as exc:  # python-keycloak raises its own errors and requests' ones
            raise UpstreamUnavailable(f"cannot read login events from Keycloak: {type(exc).__name__}: "
                                      f"{str(exc)[:200]}") from exc
        return [e for e in events if isinstance(e, dict)]


@dataclass(frozen=True)
class LoginImportResult:
    started_at: datetime
    read: int
    imported: int
    already_recorded: int
    skipped: int
    cursor: datetime | None

    def to_json_obj(self) -> dict[str, Any]:
        return {"started_at": self.started_at.isoformat(), "read": self.read, "imported": self.imported,
                "already_recorded": self.already_recorded, "skipped": self.skipped,
                "cursor": self.cursor.isoformat() if self.cursor else None}


class LoginImport:
    """One import run: Keycloak's login events since the cursor, into the outbox, once each."""

    def __init__(self, engine: Engine, recorder: AuditRecorder, events: KeycloakEvents, *, realm_url: str,
                 gateway_id: str, first_lookback: timedelta = timedelta(days=7),
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._engine = engine
        self._recorder = recorder
        self._events = events
        self._realm_url = realm_url
        self._gateway_id = gateway_id
        self._first_lookback = first_lookback
        self._clock = clock

    def run(self, *, since: datetime | None = None) -> LoginImportResult:
        cursor = self._cursor()
        start = since or (cursor - OVERLAP if cursor is not None else self._clock() - self._first_lookback)
        read = imported = already = skipped = 0
        newest = cursor
        for page in self._pages(start):
            read += len(page)
            events = []
            for kc in page:
                event = event_from_keycloak(kc, realm_url=self._realm_url, gateway_id=self._gateway_id)
                if event is None:
                    skipped += 1
                    continue
                events.append(event)
            fresh = self._record_new(events)
            already += len(events) - len(fresh)
            imported += len(fresh)
            if events:
                latest = max(e.occurred_at for e in events)
                newest = latest if newest is None or latest > newest else newest
            if newest is not None:
                self._save_cursor(newest)  # after the page is durable: a crash re-reads, never skips
        return LoginImportResult(start, read, imported, already, skipped, newest)

    def _record_new(self, events: list[AuditEvent]) -> list[AuditEvent]:
        """Record the events not in the outbox yet, in one transaction; return them.

        Another import running at the same time may record some of them between the look-up and the
        insert (the uuid is unique, so the insert fails and nothing is recorded): then look again,
        once, and record what is still missing.
        """
        for attempt in (1, 2):
            recorded = self._recorded({e.uuid for e in events})
            fresh = list({e.uuid: e for e in events if e.uuid not in recorded}.values())
            if not fresh:
                return []
            try:
                # One transaction per page: the chain, and the outbox's durability, as for any event.
                self._recorder.record_many_now(fresh)
                return fresh
            except AuditFailure:
                if attempt == 2 or len(self._recorded({e.uuid for e in fresh})) == 0:
                    raise  # not a race with another import: the outbox cannot be written
        raise AssertionError("unreachable")

    def _pages(self, start: datetime) -> Iterator[list[dict[str, Any]]]:
        first = 0
        while True:
            page = self._events.read(start, types=tuple(IMPORTED_TYPES), first=first, limit=PAGE)
            if page:
                yield page
            if len(page) < PAGE:
                return
            first += len(page)

    def _recorded(self, uuids: Iterable[str]) -> set[str]:
        wanted = list(uuids)
        found: set[str] = set()
        table = table_of(AuditOutboxRow)
        with self._engine.connect() as conn:
            for i in range(0, len(wanted), 500):
                chunk = wanted[i : i + 500]
                found.update(conn.execute(select(table.c.uuid).where(table.c.uuid.in_(chunk))).scalars())
        return found

    def _cursor(self) -> datetime | None:
        with self._engine.connect() as conn:
            value = conn.execute(select(AuditImportCursor.position)
                                 .where(AuditImportCursor.source == self._source)).scalar()
        if value is None:
            return None
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    def _save_cursor(self, position: datetime) -> None:
        """Move the cursor forward to ``position``, never back (an import that overlapped another may
        end behind it). The first run creates it; if another import created it meanwhile, or it is
        already further on, the insert is refused and the cursor is only moved forward."""
        table = table_of(AuditImportCursor)
        now = self._clock()
        forward = (table.update().where(table.c.source == self._source, table.c.position < position)
                   .values(position=position, updated_at=now))
        with audit_transaction(self._engine) as conn:
            if conn.execute(forward).rowcount:
                return
        try:
            with audit_transaction(self._engine) as conn:
                conn.execute(table.insert().values(source=self._source, position=position, updated_at=now))
        except IntegrityError:  # it exists: at or past ``position``, or created by another import just now
            with audit_transaction(self._engine) as conn:
                conn.execute(forward)

    @property
    def _source(self) -> str:
        return f"keycloak:{self._realm_url}"[:255]
