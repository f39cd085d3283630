"""``compliance keys status|rotate|rewrap|retire|destroy`` and ``compliance shred --patient ID``.

The operator's commands for the archive's keys. They run on the gateway's host and talk to the
archive's key custodian (the Orthanc storage plugin, :mod:`compliance.archive.control`) with the
gateway's archive credentials from the stack's ``gateway.env`` (mode 0600): being able to read it
is what authenticates the operator. Each command is audited like the API's, with the operating-system
user as the actor (``os:<name>``, client ``compliance-cli``), into the gateway's durable outbox
(:mod:`compliance.archive.operations`); the command fails if its event cannot be recorded.
Output is JSON.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import typer

from compliance.config import get_settings

app = typer.Typer(help="The archive's encryption keys (KEK rotation, rewrap, destruction).", no_args_is_help=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _run(call: Callable[[Any], Awaitable[dict[str, Any]]]) -> None:
    from compliance.archive.client import ArchiveKeyClient
    from compliance.archive.operations import KeyOperations
    from compliance.audit.cli import cli_engine, cli_operator, cli_recorder
    from compliance.errors import ComplianceError

    settings = get_settings()
    engine = cli_engine(settings)
    client = ArchiveKeyClient(settings.archive_url, username=settings.archive_username,
                              password=settings.archive_password.get_secret_value(),
                              dicomweb_path=settings.archive_dicomweb_path)
    ops = KeyOperations(client, cli_recorder(settings, engine), gateway_id=settings.audit_source_id)
    user = cli_operator()

    async def go() -> dict[str, Any]:
        try:
            return await call((ops, user))
        finally:
            await client.aclose()

    try:
        result = asyncio.run(go())
    except ComplianceError as exc:
        _fail(f"{exc.code}: {exc.message}")
    finally:
        engine.dispose()
    typer.echo(json.dumps(result, indent=1, default=str))


@app.command("status")
def keys_status() -> None:
    """The KEKs, their state and how many live data keys each wraps."""
    _run(lambda a: a[0].key_operation("status", a[1]))


@app.command("rotate")
def keys_rotate() -> None:
    """Create a new active KEK; new data keys are wrapped by it, older objects stay readable."""
    _run(lambda a: a[0].key_operation("rotate", a[1]))


@app.command("rewrap")
def keys_rewrap() -> None:
    """Rewrap every live data key under the active KEK (objects are not touched)."""
    _run(lambda a: a[0].key_operation("rewrap", a[1]))


@app.command("retire")
def keys_retire(kek_id: str = typer.Argument(..., help="A KEK id from 'keys status'.")) -> None:
    """Check that a KEK is retired (rotation retires the previous active KEK)."""
    _run(lambda a: a[0].key_operation("retire", a[1], kek_id))


@app.command("destroy")
def keys_destroy(kek_id: str = typer.Argument(..., help="A retired KEK that wraps no live data key.")) -> None:
    """Destroy a retired KEK (run 'keys rewrap' first)."""
    _run(lambda a: a[0].key_operation("destroy", a[1], kek_id))


def shred(patient: str = typer.Option(..., "--patient", help="The PatientID whose data key is destroyed.")) -> None:
    """Crypto-shred a patient: destroy the data key; the patient's stored objects become undecryptable."""
    _run(lambda a: a[0].shred_patient(patient, a[1]))
