"""``compliance keys status|rotate|rewrap|retire|destroy``, ``compliance shred request|list|show|approve|...``.

The operator's commands for the archive's keys. They run on the gateway's host and talk to the
archive's key custodian (the Orthanc storage plugin, :mod:`compliance.archive.control`) with the
gateway's archive credentials from the stack's ``gateway.env`` (mode 0600): being able to read it
is what authenticates the operator. Each command is audited like the API's, with the operating-system
user as the actor (``os:<name>``, client ``compliance-cli``), into the gateway's durable outbox
(:mod:`compliance.archive.operations`); the command fails if its event cannot be recorded.
Output is JSON.

A shred is a request one administrator asks for and a different one approves
(:mod:`compliance.archive.shred`): the operating-system account that asked cannot approve, and a
patient under a legal hold is refused. The other administrator may approve through the API.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import typer

from compliance.cli.common import fail, operator
from compliance.config import get_settings
from compliance.wiring import Role, Wiring

if TYPE_CHECKING:
    from compliance.archive.operations import KeyOperations
    from compliance.archive.shred import ShredRequests
    from compliance.audit.message import UserRef

app = typer.Typer(help="The archive's encryption keys (KEK rotation, rewrap, destruction).", no_args_is_help=True)
shred_app = typer.Typer(help="Crypto-shred requests: one administrator asks, a different one approves.",
                        no_args_is_help=True)


@dataclass(frozen=True)
class _Operator:
    ops: KeyOperations
    shreds: ShredRequests
    user: UserRef


def _run(call: Callable[[_Operator], Awaitable[dict[str, Any]]]) -> None:
    from compliance.errors import ComplianceError

    services = Wiring(get_settings(), Role.CLI)

    async def run_and_close() -> dict[str, Any]:
        try:
            return await call(_Operator(services.key_operations, services.shred_requests, operator()))
        finally:
            await services.aclose()

    try:
        result = asyncio.run(run_and_close())
    except ComplianceError as exc:
        fail(f"{exc.code}: {exc.message}")
    typer.echo(json.dumps(result, indent=1, default=str))


@app.command("status")
def keys_status() -> None:
    """The KEKs, their state and how many live data keys each wraps."""
    _run(lambda a: a.ops.key_operation("status", a.user))


@app.command("rotate")
def keys_rotate() -> None:
    """Create a new active KEK; new data keys are wrapped by it, older objects stay readable."""
    _run(lambda a: a.ops.key_operation("rotate", a.user))


@app.command("rewrap")
def keys_rewrap() -> None:
    """Rewrap every live data key under the active KEK (objects are not touched)."""
    _run(lambda a: a.ops.key_operation("rewrap", a.user))


@app.command("retire")
def keys_retire(kek_id: str = typer.Argument(..., help="A KEK id from 'keys status'.")) -> None:
    """Check that a KEK is retired (rotation retires the previous active KEK)."""
    _run(lambda a: a.ops.key_operation("retire", a.user, kek_id))


@app.command("destroy")
def keys_destroy(kek_id: str = typer.Argument(..., help="A retired KEK that wraps no live data key.")) -> None:
    """Destroy a retired KEK (run 'keys rewrap' first)."""
    _run(lambda a: a.ops.key_operation("destroy", a.user, kek_id))


@shred_app.command("request")
def shred_request(patient: str = typer.Option(..., "--patient", help="The PatientID whose data key is destroyed."),
                  reason: str = typer.Option(..., "--reason", help="Why (on the audit trail).")) -> None:
    """Ask for a crypto-shred; a second, different administrator approves it (nothing is destroyed yet)."""
    _run(lambda a: a.shreds.request(a.user, patient, reason))


@shred_app.command("list")
def shred_list(state: str = typer.Option("requested", "--state",
                                         help="requested, approved, rejected, shredded or all.")) -> None:
    """Shred requests in a state, the newest first (pending ones by default)."""

    async def list_in_state(a: _Operator) -> dict[str, Any]:
        return {"requests": await a.shreds.list_requests(None if state == "all" else state)}

    _run(list_in_state)


@shred_app.command("show")
def shred_show(request_id: str = typer.Argument(..., help="A shred request id.")) -> None:
    """One shred request."""
    _run(lambda a: a.shreds.get(request_id))


@shred_app.command("approve")
def shred_approve(request_id: str = typer.Argument(..., help="A pending shred request asked by someone else."),
                  comment: str = typer.Option("", "--comment", help="On the audit trail.")) -> None:
    """Approve another administrator's shred request: the patient's data key is destroyed at once."""
    _run(lambda a: a.shreds.approve(request_id, a.user, comment))


@shred_app.command("reject")
def shred_reject(request_id: str = typer.Argument(..., help="A pending shred request."),
                 comment: str = typer.Option(..., "--comment", help="Why (on the audit trail).")) -> None:
    """Reject (or, as its requester, withdraw) a pending shred request; nothing is destroyed."""
    _run(lambda a: a.shreds.reject(request_id, a.user, comment))


@shred_app.command("execute")
def shred_execute(request_id: str = typer.Argument(..., help="An approved shred request.")) -> None:
    """Run an approved shred again when its first run failed or its outcome is unknown (idempotent)."""
    _run(lambda a: a.shreds.execute(request_id, a.user))
