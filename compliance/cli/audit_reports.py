"""``compliance audit search|report|detect|import-logins``: the privacy officer's commands and the batch jobs.

``search`` and ``report`` work two ways, and the read is audited as 110101 Audit Log Used either way:

* through the gateway's API (``--gateway URL`` with ``--token`` or ``COMPLIANCE_TOKEN``, e.g.
  ``--token "$(compliance token priya)"``): the gateway decides and audits, as for any client;
* directly against Elasticsearch as a local operator (no ``--gateway``): the 110101 event names the
  operating-system user, through the outbox like every event.

``detect`` runs the detections once (``policies/detections.yaml``) over the events since the last
run; schedule it with cron or a systemd timer (see :mod:`compliance.audit.detection`). It reads
Elasticsearch directly as the local operator, and that read is audited too: one 110101 event per run,
naming the operating-system user.

``import-logins`` copies Keycloak's login events into the trail (:mod:`compliance.audit.logins`); run
it before ``detect``, so that the failed-authentication bursts see the logins Keycloak refused.

:func:`register` adds the commands to the ``audit`` typer app, wherever that app lives.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import httpx
import typer

from compliance.cli.common import fail, operator, wiring
from compliance.wiring import Wiring

if TYPE_CHECKING:
    from compliance.audit.queries import AuditPage, AuditQueryService

__all__ = ["register"]

T = TypeVar("T")


def _when(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        fail(f"{name}: not an ISO 8601 time: {value!r}", 2)
        raise
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _record_operator_read(services: Wiring, query: dict[str, Any], ok: bool, note: str | None = None) -> None:
    from compliance.audit.codes import Outcome
    from compliance.audit.events import audit_log_used_event

    settings = services.settings
    services.recorder.record_now(audit_log_used_event(
        user=operator(),
        gateway_id=settings.audit_source_id,
        outcome=Outcome.SUCCESS if ok else Outcome.SERIOUS_FAILURE,
        audit_log_uri=f"{settings.elasticsearch_url.rstrip('/')}/{settings.audit_index_prefix}-*",
        query=json.dumps(query, sort_keys=True, default=str).encode(),
        outcome_description=note,
    ))


def _read_directly(query: dict[str, Any], read: Callable[[AuditQueryService], T], *, timeout: float) -> T:
    """Run ``read`` on an audit query service over Elasticsearch; the read is audited either way.

    The 110101 event is durable before anything read is printed: if it cannot be recorded, the
    command fails and shows nothing.
    """
    from compliance.audit.queries import AuditQueryService
    from compliance.errors import ComplianceError

    with wiring() as services:
        try:
            client = services.elasticsearch.options(request_timeout=timeout, max_retries=3)
        except ComplianceError as exc:  # the TLS material cannot be read: nothing was asked
            fail(exc.message)
        try:
            result = read(AuditQueryService(client, services.settings.audit_index_prefix))
        except ComplianceError as exc:
            _record_operator_read(services, query, False, exc.message[:1000])
            fail(exc.message)
        _record_operator_read(services, query, True)
        return result


def _write_output(output: Path, body: bytes) -> None:
    """Write a report file whole or not at all (a temporary file renamed into place)."""
    import os
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(body)
            os.replace(tmp, output)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror or exc}")


def _api_get(gateway: str, token: str, path: str, params: list[tuple[str, Any]]) -> httpx.Response:

    try:
        resp = httpx.get(gateway.rstrip("/") + path, params=params, timeout=300,
                         headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError as exc:
        fail(f"cannot reach the gateway at {gateway}: {type(exc).__name__}")
        raise
    if resp.status_code != 200:
        fail(f"the gateway answered {resp.status_code}: {resp.text[:500]}")
    return resp


def _params(**values: Any) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in values.items():
        if value is None:
            continue
        for v in value if isinstance(value, list | tuple) else [value]:
            out.append((key, str(v)))
    return out


def audit_search(
    user: list[str] = typer.Option(None, "--user", help="User login name or subject (repeatable)."),  # noqa: B008 - typer's option declaration
    patient: list[str] = typer.Option(None, "--patient", help="Patient ID (repeatable)."),  # noqa: B008 - typer's option declaration
    study: list[str] = typer.Option(None, "--study", help="Study Instance UID (repeatable)."),  # noqa: B008 - typer's option declaration
    event_type: list[str] = typer.Option(None, "--event-type", help="EventID or EventTypeCode, e.g. 110112."),  # noqa: B008 - typer's option declaration
    outcome: list[int] = typer.Option(None, "--outcome", help="0, 4, 8 or 12 (repeatable)."),  # noqa: B008 - typer's option declaration
    source_address: list[str] = typer.Option(None, "--source-address", help="Client address (repeatable)."),  # noqa: B008 - typer's option declaration
    start: str = typer.Option(None, "--from", help="ISO 8601 start (inclusive); UTC if no offset."),
    end: str = typer.Option(None, "--to", help="ISO 8601 end (exclusive)."),
    sort: str = typer.Option("desc", help="asc or desc by time."),
    size: int = typer.Option(100, help="Events per page (1-1000)."),
    cursor: str = typer.Option(None, help="next_cursor of a previous page."),
    gateway: str = typer.Option(None, help="Gateway base URL; without it, read Elasticsearch directly."),
    token: str = typer.Option(None, envvar="COMPLIANCE_TOKEN", help="Bearer token for --gateway."),
) -> None:
    """Search the audit trail; prints one JSON page (events, total, next_cursor)."""

    if gateway:
        if not token:
            fail("--gateway needs --token or COMPLIANCE_TOKEN (e.g. $(compliance token priya))", 2)
        resp = _api_get(gateway, token, "/api/v1/audit/events", _params(
            user=user, patient=patient, study=study, event_type=event_type, outcome=outcome,
            source_address=source_address, sort=sort, size=size, cursor=cursor,
            **{"from": start, "to": end}))
        typer.echo(json.dumps(resp.json(), indent=1))
        return
    from compliance.audit.queries import AuditSearch

    query = {"command": "audit search", "user": user, "patient": patient, "study": study,
             "event_type": event_type, "outcome": outcome, "source_address": source_address,
             "from": start, "to": end, "sort": sort, "size": size, "cursor": cursor}
    since, until = _when(start, "--from"), _when(end, "--to")

    def read(queries: AuditQueryService) -> AuditPage:
        # the search is validated here, inside the audited read: a refused query is recorded too
        search = AuditSearch(users=tuple(user or ()), patients=tuple(patient or ()), studies=tuple(study or ()),
                             event_types=tuple(event_type or ()), outcomes=tuple(outcome or ()),
                             source_addresses=tuple(source_address or ()), start=since, end=until)
        # an order other than asc/desc is refused by the search itself, inside the audited read
        return queries.search(search, size=size, order=cast(Literal["asc", "desc"], sort), cursor=cursor)

    page = _read_directly(query, read, timeout=60)
    typer.echo(json.dumps({"events": page.events, "count": len(page.events), "total": page.total,
                           "next_cursor": page.next_cursor}, indent=1))


def audit_report(
    kind: str = typer.Argument(..., help="patient-access, user-activity, disclosures or security."),
    patient: str = typer.Option(None, "--patient", help="Patient ID (patient-access, disclosures)."),
    user: str = typer.Option(None, "--user", help="User login name or subject (user-activity)."),
    start: str = typer.Option(None, "--from", help="ISO 8601 start; default six years back (patient "
                              "reports) or 30 days."),
    end: str = typer.Option(None, "--to", help="ISO 8601 end; default now."),
    fmt: str = typer.Option("json", "--format", help="json, csv or pdf (pdf: patient-access, disclosures)."),
    output: Path = typer.Option(None, "--output", help="Write to FILE instead of standard output."),  # noqa: B008 - typer's option declaration
    gateway: str = typer.Option(None, help="Gateway base URL; without it, read Elasticsearch directly."),
    token: str = typer.Option(None, envvar="COMPLIANCE_TOKEN", help="Bearer token for --gateway."),
) -> None:
    """Run a HIPAA report over the audit trail."""
    from compliance.audit.reports import ReportFormat, ReportKind, render
    from compliance.config import get_settings

    try:
        kind_ = ReportKind(kind)
        fmt_ = ReportFormat(fmt)
    except ValueError:
        fail(f"unknown report or format: {kind!r} / {fmt!r}", 2)
        raise
    if fmt_ is ReportFormat.PDF and output is None and sys.stdout.isatty():
        fail("a PDF needs --output FILE", 2)
    if gateway:
        if not token:
            fail("--gateway needs --token or COMPLIANCE_TOKEN (e.g. $(compliance token priya))", 2)
        resp = _api_get(gateway, token, f"/api/v1/audit/reports/{kind_.value}", _params(
            patient=patient, user=user, format=fmt_.value, **{"from": start, "to": end}))
        body = resp.content
    else:
        from compliance.audit.reports import ReportService

        settings = get_settings()
        query = {"command": "audit report", "report": kind_.value, "patient": patient, "user": user,
                 "from": start, "to": end, "format": fmt_.value}
        since, until = _when(start, "--from"), _when(end, "--to")
        body = _read_directly(query, lambda queries: render(
            ReportService(queries, organization=settings.organization_name).run(
                kind_, patient=patient, user=user, start=since, end=until), fmt_), timeout=300)
    if output is not None:
        _write_output(output, body)
        typer.echo(f"wrote {len(body)} bytes to {output}", err=True)
    else:
        sys.stdout.buffer.write(body)
        sys.stdout.flush()


def audit_detect(
    since: str = typer.Option(None, help="Start of the window (default: where the last run ended)."),
    until: str = typer.Option(None, help="End of the window (default: now minus settle_seconds; never past "
                              "the oldest event still waiting to be shipped)."),
    policy_file: Path = typer.Option(None, "--policy", help="Detection policy (default from settings)."),  # noqa: B008 - typer's option declaration
) -> None:
    """Run the detections once over new audit events; findings become 110113 alerts and review items.

    Prints the run as JSON (window, findings, opened review items, events read per rule, whether unshipped
    events held the window back). The read is recorded as a 110101 Audit Log Used event naming the
    operating-system user, durably, before any finding is raised or anything is printed.
    """
    from elasticsearch import ApiError, TransportError

    from compliance.audit.detection.job import DetectionJob
    from compliance.audit.detection.policy import DetectionPolicy
    from compliance.audit.detection.rules import DetectionEngine
    from compliance.audit.detection.window import OutboxBacklog
    from compliance.audit.documents import event_indices
    from compliance.audit.queries import AuditQueryService
    from compliance.audit.review import SqlReviewQueue
    from compliance.auth.directory import KeycloakDirectory, StaticDirectory, UserDirectory
    from compliance.config import get_settings
    from compliance.errors import ComplianceError, UpstreamUnavailable

    settings = get_settings()
    try:
        policy = DetectionPolicy.from_file(policy_file or settings.audit_detections_file)
    except ComplianceError as exc:
        fail(exc.message, 2)
        raise
    window = (_when(since, "--since"), _when(until, "--until"))
    directory: UserDirectory
    if settings.oidc_client_secret.get_secret_value():
        directory = KeycloakDirectory(settings.keycloak_url, settings.keycloak_realm,
                                      client_id=settings.oidc_client_id,
                                      client_secret=settings.oidc_client_secret.get_secret_value())
    else:
        typer.echo("warning: no COMPLIANCE_OIDC_CLIENT_SECRET: the disabled-account and family-name rules "
                   "see no accounts", err=True)
        directory = StaticDirectory()
    prefix = settings.audit_index_prefix
    with wiring() as services:
        try:
            client = services.elasticsearch.options(request_timeout=120, max_retries=3)
        except ComplianceError as exc:
            fail(exc.message)

        def refresh() -> None:
            try:
                client.indices.refresh(index=event_indices(prefix), allow_no_indices=True, ignore_unavailable=True)
            except (ApiError, TransportError) as exc:
                raise UpstreamUnavailable(f"cannot refresh the audit repository: {type(exc).__name__}") from exc

        engine = services.engine
        try:
            job = DetectionJob(DetectionEngine(AuditQueryService(client, prefix), policy, directory), policy,
                               SqlReviewQueue(engine), services.recorder, gateway_id=settings.audit_source_id,
                               backlog=OutboxBacklog(engine), reader=operator(),
                               audit_log_uri=f"{settings.elasticsearch_url.rstrip('/')}/{prefix}-*", refresh=refresh)
            run = job.run(since=window[0], until=window[1])
        except ComplianceError as exc:
            fail(exc.message)
    if run.held_back is not None:
        typer.echo(f"warning: window held back at {run.window_end.isoformat()} (asked for "
                   f"{(run.requested_end or run.window_end).isoformat()}): {run.held_back.pending} audit event(s) "
                   "wait to be shipped; the next run examines them once they are (compliance audit status)", err=True)
    typer.echo(json.dumps(run.to_json_obj()))


def audit_import_logins(
    since: str = typer.Option(None, "--since", help="Read from this time (ISO 8601) instead of the cursor."),
) -> None:
    """Copy Keycloak's login events (logins, refused logins, logouts) into the audit trail as 110114
    User Authentication events, once each (run it from cron, before ``detect``). Prints a JSON summary."""
    from compliance.audit.logins import KeycloakAdminEvents, LoginImport
    from compliance.config import get_settings
    from compliance.errors import ComplianceError

    settings = get_settings()
    start = _when(since, "--since")
    secret = settings.oidc_client_secret.get_secret_value()
    if not secret:
        fail("COMPLIANCE_OIDC_CLIENT_SECRET is not set: the import reads Keycloak's events as the gateway's "
              "confidential client", 2)
    realm_url = settings.keycloak_realm_url
    events = KeycloakAdminEvents(settings.keycloak_url, settings.keycloak_realm,
                                 client_id=settings.oidc_client_id, client_secret=secret)
    with wiring() as services:
        try:
            result = LoginImport(services.engine, services.recorder, events, realm_url=realm_url,
                                 gateway_id=settings.audit_source_id).run(since=start)
        except ComplianceError as exc:
            fail(exc.message)
    typer.echo(json.dumps(result.to_json_obj()))


def register(audit_app: typer.Typer) -> None:
    """Add ``search``, ``report``, ``detect`` and ``import-logins`` to the ``compliance audit`` command group."""
    audit_app.command("search")(audit_search)
    audit_app.command("report")(audit_report)
    audit_app.command("detect")(audit_detect)
    audit_app.command("import-logins")(audit_import_logins)
