"""``compliance exports``: request, decide, follow and download research exports through the gateway API.

Every command talks to the gateway (``--gateway``, default the configured listener) with a Keycloak
access token: ``--token``/``COMPLIANCE_TOKEN``, else a password grant for ``--user`` on the CLI
client (password from ``COMPLIANCE_TOKEN_PASSWORD``, the demo password in development, else a prompt).
Exit codes: 0 done, 1 the gateway refused, the job failed or a push reached its destination only in part,
2 bad usage.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from compliance.cli.common import fail, login_password, password_grant
from compliance.config import get_settings

app = typer.Typer(help="Research exports (projects, request, list, approve, reject, status, download, destinations).",
                  no_args_is_help=True,
                  add_completion=False)

Gateway = Annotated[str | None, typer.Option("--gateway", help="gateway base URL")]
User = Annotated[str | None, typer.Option("--user", "-u", help="log in as USER (Keycloak password grant)")]
Token = Annotated[str | None, typer.Option("--token", envvar="COMPLIANCE_TOKEN", help="a bearer token")]


def _base(gateway: str | None) -> str:
    s = get_settings()
    return (gateway or f"http://{s.host}:{s.port}").rstrip("/")


def _token(user: str | None, token: str | None) -> str:
    if token:
        return token
    if not user:
        typer.echo("error: give --user or --token (or COMPLIANCE_TOKEN)", err=True)
        raise typer.Exit(2)
    from keycloak.exceptions import KeycloakError

    try:
        return password_grant(user, login_password(user, os.environ.get("COMPLIANCE_TOKEN_PASSWORD")))
    except KeycloakError as exc:
        fail(f"Keycloak refused the login for {user!r} ({exc.response_code})")


def _call(method: str, url: str, token: str, **kw: Any) -> dict[str, Any]:
    resp = httpx.request(method, url, headers={"Authorization": f"Bearer {token}"}, timeout=60, **kw)
    if resp.status_code >= 400:
        typer.echo(f"error: {resp.status_code} {resp.text[:1000]}", err=True)
        raise typer.Exit(1)
    body: dict[str, Any] = resp.json()
    return body


@app.command()
def request(
    project: Annotated[str, typer.Option(help="a registered research project you belong to (see: compliance "
                                              "exports projects)")],
    protocol: Annotated[str, typer.Option(help="protocol or IRB id")],
    purpose: Annotated[str, typer.Option(help="purpose of use")],
    study: Annotated[list[str] | None, typer.Option("--study", help="a Study Instance UID (repeatable)")] = None,
    filter_: Annotated[list[str] | None, typer.Option("--filter", help="QIDO-RS filter KEY=VALUE (repeatable)")]
    = None,
    profile: Annotated[str, typer.Option(help="de-identification profile (policies/deid/)")] = "research",
    destination: Annotated[str, typer.Option(
        help="'bundle' (download), or the name of a research archive of the allow-list "
             "(see: compliance exports destinations)")] = "bundle",
    gateway: Gateway = None, user: User = None, token: Token = None,
) -> None:
    """Request an export of a cohort; prints the request (JSON)."""
    filters = dict(f.split("=", 1) for f in filter_ or [] if "=" in f)
    if bool(study) == bool(filters):
        typer.echo("error: give --study UIDs or --filter KEY=VALUE (one of them)", err=True)
        raise typer.Exit(2)
    cohort = {"study_uids": list(study or [])} if study else {"filters": filters}
    body = {"project": project, "protocol": protocol, "purpose": purpose, "profile": profile, "cohort": cohort,
            "destination": "bundle" if destination == "bundle" else {"kind": "dicomweb", "name": destination}}
    typer.echo(json.dumps(_call("POST", f"{_base(gateway)}/api/v1/exports", _token(user, token), json=body),
                          indent=1))


@app.command()
def projects(gateway: Gateway = None, user: User = None, token: Token = None) -> None:
    """List the registered research projects: yours (researcher), or all with their members (steward) (JSON)."""
    typer.echo(json.dumps(_call("GET", f"{_base(gateway)}/api/v1/exports/projects", _token(user, token)),
                          indent=1))


def _members(registration: dict[str, Any]) -> str:
    members = registration.get("members") or {}
    groups, users = members.get("groups") or [], members.get("users") or []
    parts = ([f"groups {', '.join(groups)}"] if groups else []) + ([f"users {', '.join(users)}"] if users else [])
    return "; ".join(parts) or "none"


def listing(items: list[dict[str, Any]]) -> str:
    """Requests as a steward reviews them: one block each, with the project's registered membership and
    how the requester belongs to it."""
    blocks = []
    for r in items:
        reg = r.get("project_registration") or {"registered": False}
        if reg.get("registered"):
            project = f"{r['project']} - {reg.get('title')}" + (" (CLOSED)" if reg.get("closed") else "")
            protocols = ", ".join(reg.get("protocols") or []) or "none registered"
            members = _members(reg)
        else:
            project, protocols, members = f"{r['project']} (NOT REGISTERED)", "-", "-"
        requester = r["requester"]
        membership = requester.get("membership")
        who = f"{requester['username']} ({'member by ' + membership if membership else 'membership never checked'})"
        cohort = r.get("cohort") or {}
        what = (f"{len(cohort['study_uids'])} studies" if cohort.get("study_uids")
                else f"filters {json.dumps(cohort.get('filters') or {}, sort_keys=True)}")
        dest = r.get("destination") or {}
        lines = [
            f"{r['id']}  {r['state']}  created {r.get('created_at')}",
            f"  project    {project}",
            f"  members    {members}",
            f"  requester  {who}",
            f"  protocol   {r['protocol']} (registered: {protocols})",
            f"  purpose    {r['purpose']}",
            f"  cohort     {what}, profile {r['profile']}, destination {dest.get('name') or dest.get('kind')}",
        ]
        if r.get("approver"):
            lines.append(f"  decided    by {r['approver']['username']}: {r.get('comment')}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + ("\n" if blocks else "no export requests\n")


@app.command("list")
def list_requests(
    state: Annotated[str | None, typer.Option(help="only requests in this state (e.g. requested)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the API's JSON instead of the review listing")] = False,
    gateway: Gateway = None, user: User = None, token: Token = None,
) -> None:
    """List export requests (a steward: all, with each project's members and the requester's membership)."""
    out = _call("GET", f"{_base(gateway)}/api/v1/exports", _token(user, token),
                params={"state": state} if state else None)
    typer.echo(json.dumps(out, indent=1) if as_json else listing(out["items"]), nl=as_json)


@app.command()
def destinations(gateway: Gateway = None, user: User = None, token: Token = None) -> None:
    """List where exports may go: the bundle and the configured research archives (JSON)."""
    typer.echo(json.dumps(_call("GET", f"{_base(gateway)}/api/v1/exports/destinations", _token(user, token)),
                          indent=1))


def _decide(verb: str, request_id: str, comment: str, gateway: str | None, user: str | None,
            token: str | None) -> None:
    out = _call("POST", f"{_base(gateway)}/api/v1/exports/{request_id}/{verb}", _token(user, token),
                json={"comment": comment})
    typer.echo(json.dumps(out, indent=1))
    dispatch = out.get("dispatch") if isinstance(out, dict) else None
    if isinstance(dispatch, dict) and dispatch.get("status") == "pending":
        typer.echo(f"note: {dispatch.get('detail')}", err=True)


@app.command()
def approve(request_id: str, comment: Annotated[str, typer.Option(help="why")], gateway: Gateway = None,
            user: User = None, token: Token = None) -> None:
    """Approve an export request (data steward; never your own)."""
    _decide("approve", request_id, comment, gateway, user, token)


@app.command()
def reject(request_id: str, comment: Annotated[str, typer.Option(help="why")], gateway: Gateway = None,
           user: User = None, token: Token = None) -> None:
    """Reject an export request (data steward)."""
    _decide("reject", request_id, comment, gateway, user, token)


@app.command()
def status(
    request_id: str,
    wait: Annotated[bool, typer.Option("--wait", help="follow the job with a progress bar until it ends")] = False,
    interval: Annotated[float, typer.Option(help="seconds between polls with --wait")] = 1.0,
    gateway: Gateway = None, user: User = None, token: Token = None,
) -> None:
    """Show a request's state and progress; with --wait, a progress bar until ready/failed."""
    bearer = _token(user, token)
    url = f"{_base(gateway)}/api/v1/exports/{request_id}"
    current = _call("GET", url, bearer)
    if wait:
        with typer.progressbar(length=100, label=f"export {request_id[:8]}") as bar:
            shown = 0
            while current["state"] in ("requested", "approved", "running"):
                pct = int(current["progress"]["percent"])
                bar.update(max(0, pct - shown))
                shown = max(shown, pct)
                time.sleep(interval)
                current = _call("GET", url, bearer)
            bar.update(max(0, 100 - shown) if current["state"] == "ready" else 0)
    typer.echo(json.dumps(current, indent=1))
    delivery = current.get("delivery") or {}
    if current["state"] in ("failed", "rejected", "expired") or delivery.get("failed") or delivery.get("unconfirmed"):
        raise typer.Exit(1)  # failed, or pushed to a destination only in part


@app.command()
def download(request_id: str, output: Annotated[Path, typer.Argument(help="where to write the zip")],
             gateway: Gateway = None, user: User = None, token: Token = None) -> None:
    """Download the bundle (the requester only) and verify its sha256."""
    bearer = _token(user, token)
    sha = hashlib.sha256()
    tmp = output.with_name(output.name + ".part")
    with httpx.stream("GET", f"{_base(gateway)}/api/v1/exports/{request_id}/bundle",
                      headers={"Authorization": f"Bearer {bearer}"}, timeout=300) as resp:
        if resp.status_code != 200:
            resp.read()
            typer.echo(f"error: {resp.status_code} {resp.text[:1000]}", err=True)
            raise typer.Exit(1)
        expected = resp.headers.get("x-content-sha256", "")
        with tmp.open("wb") as fh:
            for chunk in resp.iter_bytes():
                sha.update(chunk)
                fh.write(chunk)
    if sha.hexdigest() != expected:
        tmp.unlink(missing_ok=True)
        typer.echo("error: the download does not match the bundle's checksum", err=True)
        raise typer.Exit(1)
    tmp.replace(output)
    typer.echo(json.dumps({"output": str(output), "sha256": expected}))
