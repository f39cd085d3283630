"""What every ``compliance`` command shares: one way to fail, the local operator as an audit user, and
the services of the composition root (:class:`compliance.wiring.Wiring`, role CLI)."""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer

from compliance.audit.message import UserRef
from compliance.config import get_settings
from compliance.wiring import Role, Wiring


def fail(message: str, code: int = 1) -> NoReturn:
    """``error: <message>`` on stderr and exit ``code`` (1: refused or failed, 2: bad usage)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def operator() -> UserRef:
    """The local operator running a CLI command, as an audit user: the operating-system account of
    the process's user id. Not ``getpass.getuser()``, which believes USER/LOGNAME: anyone sets those, and
    a posed name would pass for a second person (the two-person shred, compliance/archive/shred.py)."""
    try:
        name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid without an account (a container): the number is still who it is
        name = f"uid{os.getuid()}"
    return UserRef(user_id=f"os:{name}", username=name, client_id="compliance-cli")


@contextmanager
def wiring() -> Iterator[Wiring]:
    """The command's services (built on first use from the settings), released when the command ends."""
    services = Wiring(get_settings(), Role.CLI)
    try:
        yield services
    finally:
        services.close()


def login_password(username: str, password: str | None) -> str:
    """The password of a CLI login: the one given (``COMPLIANCE_TOKEN_PASSWORD``), else the demo
    password ``demo-USERNAME`` in development, else a prompt."""
    if password is not None:
        return password
    if get_settings().environment == "development":
        return f"demo-{username}"
    return str(typer.prompt("password", hide_input=True))


def password_grant(username: str, password: str) -> str:
    """An access token for ``username`` from Keycloak (resource-owner password grant on the public CLI
    client). Raises :class:`keycloak.exceptions.KeycloakError` when Keycloak refuses."""
    from keycloak import KeycloakOpenID

    settings = get_settings()
    oidc = KeycloakOpenID(server_url=settings.keycloak_url.rstrip("/") + "/", realm_name=settings.keycloak_realm,
                          client_id=settings.keycloak_cli_client_id)
    return str(oidc.token(username=username, password=password)["access_token"])
