"""Keycloak's login events into the outbox as 110114 User Authentication (compliance/audit/logins.py).

Pure logic on a real SQLite outbox; Keycloak's admin API is replaced by a list of its event
representations (the real one is read in tests/integration/test_login_import.py).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from compliance.audit import logins
from compliance.audit.atna import AuditSource, to_atna_xml, validate_atna_xml
from compliance.audit.documents import to_document
from compliance.audit.logins import OVERLAP, LoginImport, event_from_keycloak, event_uuid
from compliance.audit.recorder import AuditRecorder
from compliance.errors import AuditFailure

REALM = "http://127.0.0.1:8180/realms/imaging"
SOURCE = AuditSource(source_id="gw", enterprise_site_id="site")
T0 = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)


def kc(n: int, kind: str = "LOGIN", *, user: str | None = "u-alice", name: str = "alice", error: str | None = None,
       at: datetime = T0) -> dict:
    event = {"id": f"kc-{n}", "time": int((at + timedelta(seconds=n)).timestamp() * 1000), "type": kind,
             "realmId": "r", "clientId": "compliance-cli", "ipAddress": "10.1.2.3",
             "details": {"username": name, "grant_type": "password", "auth_method": "openid-connect"}}
    if user:
        event["userId"] = user
    if error:
        event["error"] = error
    return event


def doc(event):
    return to_document(event, SOURCE)


def test_a_login_and_a_refused_login_become_110114_events_that_validate():
    ok = event_from_keycloak(kc(1), realm_url=REALM, gateway_id="gw")
    refused = event_from_keycloak(kc(2, "LOGIN_ERROR", user=None, name="mallory", error="user_not_found"),
                                  realm_url=REALM, gateway_id="gw")
    for event in (ok, refused):
        validate_atna_xml(to_atna_xml(event, SOURCE))
    d = doc(ok)
    assert (d["event.id"], d["event.outcome"], d["event.type_codes"]) == ("110114", 0, ["110122"])
    assert (d["user.id"], d["user.name"], d["source.address"]) == ("u-alice", "alice", "10.1.2.3")
    assert d["@timestamp"].startswith("2026-11-30T08:00:01")
    assert d["event.outcome_description"] == ("Keycloak LOGIN, client compliance-cli, grant type password, "
                                              "auth method openid-connect")
    assert REALM in d["participant.ids"]
    r = doc(refused)
    assert (r["event.outcome"], r["user.id"], r["user.name"]) == (4, "unverified:mallory", "mallory")
    assert r["event.outcome_description"].endswith(": user_not_found")
    # what refused_logins_query() selects imported refusals by
    assert r["event.outcome_description"].startswith("Keycloak LOGIN_ERROR")
    assert ok.uuid == event_uuid(REALM, "kc-1") == event_from_keycloak(kc(1), realm_url=REALM, gateway_id="gw").uuid
    assert ok.uuid != event_uuid("http://other/realms/imaging", "kc-1")


@pytest.mark.parametrize(("kind", "type_code", "outcome"), [
    ("LOGOUT", "110123", 0), ("LOGOUT_ERROR", "110123", 4), ("CLIENT_LOGIN", "110122", 0),
    ("CLIENT_LOGIN_ERROR", "110122", 4)])
def test_logouts_and_client_logins(kind, type_code, outcome):
    d = doc(event_from_keycloak(kc(1, kind), realm_url=REALM, gateway_id="gw"))
    assert (d["event.type_codes"], d["event.outcome"]) == ([type_code], outcome)


@pytest.mark.parametrize("event", [
    kc(1, "REFRESH_TOKEN"), kc(1, "CODE_TO_TOKEN"), {**kc(1), "id": None}, {**kc(1), "time": "yesterday"},
    {**kc(1), "time": True}, {"type": "LOGIN"}])
def test_other_events_and_incomplete_ones_are_not_imported(event):
    assert event_from_keycloak(event, realm_url=REALM, gateway_id="gw") is None


class Events:
    """Keycloak's events endpoint over a list: time order, ``dateFrom`` inclusive, paged."""

    def __init__(self, events: list[dict]) -> None:
        self.events = events
        self.calls: list[tuple[datetime, int, int]] = []

    def read(self, since, *, types, first, limit):
        self.calls.append((since, first, limit))
        chosen = sorted((e for e in self.events if e["type"] in types and e["time"] >= since.timestamp() * 1000),
                        key=lambda e: e["time"])
        return chosen[first : first + limit]


def importer(outbox, events, *, now=T0 + timedelta(hours=1)):
    return LoginImport(outbox._engine, AuditRecorder(outbox, SOURCE), events, realm_url=REALM, gateway_id="gw",
                       first_lookback=timedelta(days=7), clock=lambda: now)


def test_each_keycloak_event_is_recorded_once_and_the_cursor_moves_on(outbox, monkeypatch):
    monkeypatch.setattr(logins, "PAGE", 2)  # several pages
    events = Events([kc(n, "LOGIN_ERROR" if n % 2 else "LOGIN", error="invalid_user_credentials" if n % 2 else None)
                     for n in range(5)] + [kc(9, "REFRESH_TOKEN")])
    first = importer(outbox, events).run()
    assert (first.read, first.imported, first.already_recorded, first.skipped) == (5, 5, 0, 0)
    assert first.started_at == T0 + timedelta(hours=1) - timedelta(days=7)
    assert first.cursor == T0 + timedelta(seconds=4)
    assert [c[1] for c in events.calls] == [0, 2, 4]  # paged until a short page
    recorded = [d for _, _, d in outbox.pending(100) if d["event.id"] == "110114"]
    assert [d["event.outcome"] for d in recorded] == [0, 4, 0, 4, 0]

    events.events.append(kc(7))
    again = importer(outbox, events).run()
    assert again.started_at == T0 + timedelta(seconds=4) - OVERLAP  # the cursor, read back the overlap
    assert (again.imported, again.already_recorded) == (1, 5)
    assert again.cursor == T0 + timedelta(seconds=7)
    assert len([1 for _, _, d in outbox.pending(100) if d["event.id"] == "110114"]) == 6


def test_an_import_that_cannot_record_fails_and_leaves_the_cursor(outbox, monkeypatch):
    events = Events([kc(1)])

    def broken(self, entries, **_):
        raise AuditFailure("the audit event could not be recorded")

    monkeypatch.setattr(type(outbox), "append_now", broken)
    with pytest.raises(AuditFailure):
        importer(outbox, events).run()
    monkeypatch.undo()
    retry = importer(outbox, events).run()
    assert retry.started_at == T0 + timedelta(hours=1) - timedelta(days=7), "no cursor was saved"
    assert retry.imported == 1


def test_an_import_racing_another_records_only_what_is_still_missing(outbox, monkeypatch):
    events = Events([kc(1), kc(2), kc(3)])
    other = importer(outbox, Events([kc(2)]))
    run = importer(outbox, events)
    looked = []
    real = LoginImport._recorded

    def racing(self, uuids):
        found = real(self, uuids)
        if not looked:  # the other import records kc-2 right after this one looked
            looked.append(1)
            other.run()
        return found

    monkeypatch.setattr(LoginImport, "_recorded", racing)
    result = run.run()
    assert (result.imported, result.already_recorded) == (2, 1)
    uuids = [u for _, u, d in outbox.pending(100) if d["event.id"] == "110114"]
    assert sorted(uuids) == sorted(event_uuid(REALM, f"kc-{n}") for n in (1, 2, 3))


def test_the_cursor_never_moves_back(outbox):
    from sqlalchemy import select

    from compliance.audit.models import AuditImportCursor

    def cursor():
        with outbox._engine.connect() as conn:
            value = conn.execute(select(AuditImportCursor.position)).scalar_one()
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value

    assert importer(outbox, Events([kc(30)])).run().cursor == T0 + timedelta(seconds=30)
    # An import that overlapped it and ended behind it (its insert is refused, nothing moves back).
    importer(outbox, Events([kc(10)])).run(since=T0)
    assert cursor() == T0 + timedelta(seconds=30)
    importer(outbox, Events([kc(40)])).run(since=T0)
    assert cursor() == T0 + timedelta(seconds=40)


def test_keycloak_out_of_reach_records_nothing_and_leaves_the_cursor(outbox):
    from compliance.errors import UpstreamUnavailable

    class Down:
        def read(self, since, *, types, first, limit):
            raise UpstreamUnavailable("cannot read login events from Keycloak: ConnectionError")

    with pytest.raises(UpstreamUnavailable):
        importer(outbox, Down()).run()
    assert outbox.total() == 0
    assert importer(outbox, Events([kc(1)])).run().started_at == T0 + timedelta(hours=1) - timedelta(days=7)
