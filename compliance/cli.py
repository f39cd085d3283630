"""The ``compliance`` command: serve the gateway, get demo tokens, operate the database and audit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from compliance.config import get_settings

app = typer.Typer(help="Imaging compliance gateway.", no_args_is_help=True, add_completion=False)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit trail.", no_args_is_help=True)
demo_app = typer.Typer(help="Demo data (development only).", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(audit_app, name="audit")
app.add_typer(demo_app, name="demo")


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def serve(
    host: str = typer.Option(None, help="Bind address (default from settings: 127.0.0.1)."),
    port: int = typer.Option(None, help="Port (default from settings: 8080)."),
    workers: int = typer.Option(None, help="Worker processes (one per core on one machine)."),
) -> None:
    """Run the gateway (migrates the database first)."""
    import os

    import uvicorn

    from compliance.db.migrate import upgrade

    settings = get_settings()
    if host:
        os.environ["COMPLIANCE_HOST"] = host
    if port:
        os.environ["COMPLIANCE_PORT"] = str(port)
    upgrade(settings.effective_database_url)
    uvicorn.run(
        "compliance.app:create_app_from_env",
        factory=True,
        host=host or settings.host,
        port=port or settings.port,
        workers=workers or settings.workers,
        log_level="info",
        access_log=False,
        http="httptools",
        loop="uvloop",
        timeout_graceful_shutdown=10,
    )


@app.command()
def token(
    username: str = typer.Argument(..., help="A user of the realm, e.g. alice."),
    password: str = typer.Option(None, envvar="COMPLIANCE_TOKEN_PASSWORD", help="Defaults to the demo password "
                                 "demo-USERNAME in development."),
) -> None:
    """Print an access token for USERNAME from Keycloak (public client compliance-cli)."""
    from keycloak import KeycloakOpenID
    from keycloak.exceptions import KeycloakError

    settings = get_settings()
    if password is None:
        if settings.environment != "development":
            password = typer.prompt("password", hide_input=True)
        else:
            password = f"demo-{username}"
    oidc = KeycloakOpenID(server_url=settings.keycloak_url.rstrip("/") + "/", realm_name=settings.keycloak_realm,
                          client_id=settings.keycloak_cli_client_id)
    try:
        tokens = oidc.token(username=username, password=password)
    except KeycloakError as exc:
        _fail(f"Keycloak refused the login for {username!r}: {exc.response_code} {exc.error_message!s}"[:500])
    except Exception as exc:  # connection errors from requests
        _fail(f"cannot reach Keycloak at {settings.keycloak_url}: {type(exc).__name__}")
    typer.echo(tokens["access_token"])


@db_app.command("upgrade")
def db_upgrade(url: str = typer.Option(None, help="SQLAlchemy URL (default from settings).")) -> None:
    """Apply the Alembic migrations."""
    from compliance.db.migrate import upgrade

    target = url or get_settings().effective_database_url
    upgrade(target)
    typer.echo("database schema is up to date")


@audit_app.command("status")
def audit_status() -> None:
    """How many audit events are recorded and how many still wait to be shipped."""
    from sqlalchemy.exc import SQLAlchemyError

    from compliance.audit.outbox import SqlAuditOutbox
    from compliance.db.session import make_engine

    settings = get_settings()
    outbox = SqlAuditOutbox(make_engine(settings.effective_database_url))
    try:
        typer.echo(json.dumps({"recorded": outbox.total(), "backlog": outbox.backlog()}))
    except SQLAlchemyError as exc:
        _fail(f"cannot read the audit outbox ({type(exc).__name__}); is the database migrated? "
              "run: compliance db upgrade")


@audit_app.command("ship")
def audit_ship() -> None:
    """Ship every pending outbox event to Elasticsearch now (the gateway also does this by itself)."""
    from compliance.audit.elasticsearch import ElasticsearchAuditSink
    from compliance.audit.interfaces import AuditSinkUnavailable
    from compliance.audit.outbox import AuditShipper, SqlAuditOutbox
    from compliance.db.session import make_engine

    settings = get_settings()
    outbox = SqlAuditOutbox(make_engine(settings.effective_database_url))
    shipper = AuditShipper(outbox, ElasticsearchAuditSink(settings.elasticsearch_url, settings.audit_index_prefix))
    total = 0
    try:
        while (n := shipper.ship_once()) > 0:
            total += n
    except AuditSinkUnavailable as exc:
        _fail(f"Elasticsearch is unavailable: {exc}; {outbox.backlog()} events wait in the outbox")
    typer.echo(json.dumps({"shipped": total, "backlog": outbox.backlog()}))


@audit_app.command("verify")
def audit_verify(
    from_seq: int = typer.Option(1, "--from", help="First chain position to check."),
    to_seq: int = typer.Option(None, "--to", help="Last chain position to check (default: all shipped)."),
) -> None:
    """Check the audit trail in Elasticsearch against its hash chain: 'intact' or the first broken place.

    Exit status 0 when intact, 1 when anything was modified, deleted, inserted or reordered. The check
    is itself recorded as a 110101 Audit Log Used event (actor: the operating-system user).
    """
    import getpass

    from compliance.audit.atna import AuditSource
    from compliance.audit.elasticsearch import ElasticsearchAuditSink
    from compliance.audit.events import Outcome, UserRef, audit_log_used_event
    from compliance.audit.interfaces import AuditSinkUnavailable
    from compliance.audit.outbox import SqlAuditOutbox
    from compliance.audit.recorder import AuditRecorder
    from compliance.audit.verify import verify_repository
    from compliance.db.session import make_engine

    settings = get_settings()
    outbox = SqlAuditOutbox(make_engine(settings.effective_database_url))
    sink = ElasticsearchAuditSink(settings.elasticsearch_url, settings.audit_index_prefix)
    operator = getpass.getuser()
    recorder = AuditRecorder(outbox, AuditSource(source_id=settings.audit_source_id,
                                                 enterprise_site_id=settings.audit_enterprise_site_id))
    try:
        result = verify_repository(sink.client, settings.audit_index_prefix, outbox, from_seq=from_seq,
                                   to_seq=to_seq)
    except AuditSinkUnavailable as exc:
        _fail(str(exc))
    recorder.record_now(audit_log_used_event(
        user=UserRef(user_id=f"os:{operator}", username=operator, client_id="compliance-cli"),
        gateway_id=settings.audit_source_id,
        outcome=Outcome.SUCCESS if result.intact else Outcome.MINOR_FAILURE,
        audit_log_uri=f"{settings.elasticsearch_url}/{settings.audit_index_prefix}-*",
        query=f"verify chain from {from_seq} to {to_seq or 'head'}".encode(),
        outcome_description=result.summary()[:1024],
    ))
    typer.echo(result.summary())
    for finding in result.findings:
        typer.echo(json.dumps({"kind": finding.kind, "seq": finding.seq, "event": finding.uuid,
                               "detail": finding.detail}))
    if not result.intact:
        raise typer.Exit(1)


@demo_app.command("load")
def demo_load(
    gateway: str = typer.Option("http://127.0.0.1:8080", help="Gateway base URL."),
    user: str = typer.Option("tom", help="A user allowed to store (technologist)."),
) -> None:
    """Store pydicom's bundled sample instances through the gateway (STOW-RS) as a technologist."""
    import httpx
    from pydicom.data import get_testdata_file

    settings = get_settings()
    if settings.environment != "development":
        _fail("demo data is for development only")
    from compliance.demo import demo_files, multipart_related

    files = demo_files(get_testdata_file)
    body, content_type = multipart_related([Path(f).read_bytes() for f in files])
    access_token = _token_for(user)
    resp = httpx.post(f"{gateway}/dicom-web/studies", content=body,
                      headers={"Content-Type": content_type, "Authorization": f"Bearer {access_token}",
                               "Accept": "application/dicom+json"}, timeout=60)
    if resp.status_code != 200:
        _fail(f"STOW answered {resp.status_code}: {resp.text[:500]}")
    typer.echo(f"stored {len(files)} demo instances through {gateway} as {user}")


def _token_for(username: str) -> str:
    from keycloak import KeycloakOpenID

    settings = get_settings()
    oidc = KeycloakOpenID(server_url=settings.keycloak_url.rstrip("/") + "/", realm_name=settings.keycloak_realm,
                          client_id=settings.keycloak_cli_client_id)
    return oidc.token(username=username, password=f"demo-{username}")["access_token"]


def _register_optional_subapps() -> None:
    try:
        from compliance.deid.cli import app as deid_app
    except ImportError:
        return
    app.add_typer(deid_app, name="deid")


_register_optional_subapps()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
