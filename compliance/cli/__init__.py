"""The ``compliance`` command: serve the gateway, get demo tokens, operate the database and audit."""

from __future__ import annotations

from pathlib import Path

import typer

from compliance.cli.audit import app as audit_app
from compliance.cli.audit import record_cli_authentication
from compliance.cli.audit_reports import register as register_audit_reports
from compliance.cli.common import fail, login_password, password_grant
from compliance.cli.deid import app as deid_app
from compliance.cli.exports import app as exports_app
from compliance.cli.keys import app as keys_app
from compliance.cli.keys import shred_app
from compliance.config import get_settings

app = typer.Typer(help="Imaging compliance gateway.", no_args_is_help=True, add_completion=False)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
demo_app = typer.Typer(help="Demo data (development only).", no_args_is_help=True)
register_audit_reports(audit_app)  # compliance audit search|report|detect
app.add_typer(db_app, name="db")
app.add_typer(audit_app, name="audit")
app.add_typer(demo_app, name="demo")
app.add_typer(keys_app, name="keys")
app.add_typer(deid_app, name="deid")
app.add_typer(exports_app, name="exports")


@keys_app.command("volume-password")
def keys_volume_password(
    name: str = typer.Argument("phi", help="The volume (the local stack's is 'phi')."),
    create: bool = typer.Option(False, "--create", help="Set up the key store and the volume's key if missing."),
) -> None:
    """Print an encrypted volume's password, unwrapped by the archive's KEK (compliance/archive/volume.py).

    Run as the owner of the archive's key store; the output is a secret: pipe it (into gocryptfs), never store it.
    """
    from compliance.archive.volume import main as volume_main

    raise typer.Exit(volume_main(["password", name, *(["--create"] if create else [])]))


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
    from compliance.errors import ConfigurationError

    try:
        settings = get_settings()
    except ConfigurationError as exc:  # a refused configuration is one clear line, not a traceback
        fail(f"refusing to start: {exc.message}")
        raise
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
        # X-Forwarded-For is believed only from the nginx front, next to its secret (compliance/api/edge.py);
        # uvicorn's own handling believed it from any loopback client.
        proxy_headers=False,
        http="httptools",
        loop="uvloop",
        timeout_graceful_shutdown=10,
    )


@app.command()
def front(
    listen: str = typer.Option(None, help="Where clients connect, HOST:PORT (default: the public address)."),
    backend: str = typer.Option(None, help="The gateway behind it, HOST:PORT (default: host:port)."),
    workers: int = typer.Option(1, help="nginx worker processes."),
    check: bool = typer.Option(False, "--check", help="Render and test the configuration, then exit."),
    state_dir: Path = typer.Option(None, help="nginx.conf, pid, error log (default {stack_dir}/front)."),  # noqa: B008
) -> None:
    """Run the nginx front (compliance/dicomweb/front.py) in the foreground; it pushes released retrieves' bytes."""
    import os
    import subprocess

    from compliance.dicomweb.front import nginx_command, render_nginx_config, write_config

    settings = get_settings()
    state = state_dir or settings.stack_dir / "front"
    if not settings.front_secret.get_secret_value():
        fail("no front secret is configured (COMPLIANCE_FRONT_SECRET or the stack's gateway.env): the "
              "gateway could not tell the front's requests from anyone else's", 2)
    if not settings.archive_password.get_secret_value():
        fail("no archive password is configured (COMPLIANCE_ARCHIVE_PASSWORD or the stack's gateway.env): "
              "the front could fetch nothing the gateway releases", 2)
    try:
        text = render_nginx_config(
            listen=listen or settings.effective_public_address, backend=backend or f"{settings.host}:{settings.port}",
            archive_url=settings.archive_url, archive_username=settings.archive_username,
            archive_password=settings.archive_password.get_secret_value(),
            front_secret=settings.front_secret.get_secret_value(), state_dir=state, workers=workers,
            api_max_body_bytes=settings.api_max_body_bytes, stow_max_bytes=settings.stow_max_bytes)
        command = nginx_command(write_config(text, state), state)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc), 2)
    tested = subprocess.run([*command, "-t", "-q"], capture_output=True, text=True)
    if tested.returncode != 0:
        fail(f"nginx refused the rendered configuration: {tested.stderr.strip()[:1000]}")
    if check:
        typer.echo(f"configuration ok: {state / 'nginx.conf'}")
        return
    os.execv(command[0], command)  # noqa: S606 - nginx replaces this process (a fixed argv, no shell)


@app.command()
def token(
    username: str = typer.Argument(..., help="A user of the realm, e.g. alice."),
    password: str = typer.Option(None, envvar="COMPLIANCE_TOKEN_PASSWORD", help="Defaults to the demo password "
                                 "demo-USERNAME in development."),
) -> None:
    """Print an access token for USERNAME from Keycloak (public client compliance-cli)."""
    from keycloak.exceptions import KeycloakError

    settings = get_settings()
    try:
        access_token = password_grant(username, login_password(username, password))
    except KeycloakError as exc:
        # 110114 User Authentication, failed (only when Keycloak answered: an unreachable server
        # authenticated no one).
        record_cli_authentication(username, success=False, detail=f"Keycloak refused the login: {exc.response_code}")
        fail(f"Keycloak refused the login for {username!r}: {exc.response_code} {exc.error_message!s}"[:500])
    except Exception as exc:  # connection errors from requests
        fail(f"cannot reach Keycloak at {settings.keycloak_url}: {type(exc).__name__}")
    import jwt

    subject = jwt.decode(access_token, options={"verify_signature": False}).get("sub")
    record_cli_authentication(username, success=True, detail="access token issued by Keycloak (password grant)",
                              user_id=subject)
    typer.echo(access_token)


@db_app.command("upgrade")
def db_upgrade(url: str = typer.Option(None, help="SQLAlchemy URL (default from settings).")) -> None:
    """Apply the Alembic migrations."""
    from compliance.db.migrate import upgrade

    target = url or get_settings().effective_database_url
    upgrade(target)
    typer.echo("database schema is up to date")


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
        fail("demo data is for development only")
    from compliance.demo import demo_files, multipart_related

    files = demo_files(get_testdata_file)
    body, content_type = multipart_related([Path(f).read_bytes() for f in files])
    access_token = password_grant(user, f"demo-{user}")
    resp = httpx.post(f"{gateway}/dicom-web/studies", content=body,
                      headers={"Content-Type": content_type, "Authorization": f"Bearer {access_token}",
                               "Accept": "application/dicom+json"}, timeout=60)
    if resp.status_code != 200:
        fail(f"STOW answered {resp.status_code}: {resp.text[:500]}")
    typer.echo(f"stored {len(files)} demo instances through {gateway} as {user}")


app.add_typer(shred_app, name="shred")

