"""``compliance audit ...``: the operator's view of the audit trail.

    status      recorded / backlog / chain head / last checkpoint / last shipping error
    ship        ship the outbox now
    verify      check the repository against the hash chain and the signed checkpoints
    checkpoint  sign a checkpoint over everything recorded and publish it now
    keygen      create the Ed25519 checkpoint key (mode 0600)
    prune       delete whole monthly indices past retention and not under a legal hold

Operator actions on the audit trail are themselves audited (110101 Audit Log Used, the operator as
the operating-system user).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from compliance.cli.common import fail, operator, wiring
from compliance.config import get_settings
from compliance.errors import ConfigurationError
from compliance.wiring import Wiring

if TYPE_CHECKING:
    from compliance.audit.retention import RetentionPolicy

app = typer.Typer(help="The audit trail.", no_args_is_help=True)


def record_cli_authentication(username: str, *, success: bool, detail: str, user_id: str | None = None) -> None:
    """110114 User Authentication for a login made through ``compliance token`` (best effort).

    The login itself happens at Keycloak (which keeps its own event log); the CLI records what it saw
    in the gateway's outbox. When the outbox cannot be written (no database on this machine) a warning
    is printed and the command goes on: refusing would not undo the login at Keycloak.
    """
    from compliance.audit.codes import Outcome
    from compliance.audit.events import authentication_event
    from compliance.audit.message import UserRef

    settings = get_settings()
    try:
        with wiring() as services:
            services.recorder.record_now(authentication_event(
                user=UserRef(user_id=user_id or f"unverified:{username}", username=username,
                             client_id=settings.keycloak_cli_client_id, source_address="127.0.0.1"),
                gateway_id=settings.audit_source_id,
                outcome=Outcome.SUCCESS if success else Outcome.SERIOUS_FAILURE,
                authenticator_id=settings.keycloak_realm_url,
                outcome_description=detail[:1024]))
    except Exception as exc:
        typer.echo(f"warning: the login was not recorded in the audit outbox ({type(exc).__name__})", err=True)


@app.command("status")
def audit_status() -> None:
    """Recorded events, backlog, chain head, last checkpoint, and the last shipping error (JSON)."""
    with wiring() as services:
        _status(services)


def _status(services: Wiring) -> None:
    from sqlalchemy import func, select
    from sqlalchemy.exc import SQLAlchemyError

    from compliance.audit.checkpoints import SqlCheckpointStore
    from compliance.audit.models import AuditOutboxDelivery, AuditOutboxRow
    from compliance.db.base import table_of

    settings, engine, outbox = services.settings, services.engine, services.outbox
    table, delivery = table_of(AuditOutboxRow), table_of(AuditOutboxDelivery)
    try:
        seq, head_hash = outbox.chain_head()
        last = SqlCheckpointStore(engine).last()
        with engine.connect() as conn:
            oldest = conn.execute(select(table.c.seq, table.c.recorded_at, table.c.attempts, table.c.last_error)
                                  .where(table.c.shipped_at.is_(None)).order_by(table.c.seq).limit(1)).first()
            errored = conn.execute(select(table.c.last_error).where(table.c.shipped_at.is_(None),
                                                                    table.c.last_error.is_not(None))
                                   .order_by(table.c.seq.desc()).limit(1)).scalar()
            counts = conn.execute(select(delivery.c.sink, func.count()).group_by(delivery.c.sink)).all()
            per_sink: dict[str, int] = {str(sink): int(count) for sink, count in counts}
        report = {
            "recorded": outbox.total(),
            "backlog": outbox.backlog(),
            "chain_head": {"seq": seq, "hash": head_hash},
            "shipped_head": outbox.shipped_head(),
            "oldest_pending": None if oldest is None else {"seq": oldest.seq,
                                                           "recorded_at": oldest.recorded_at.isoformat()},
            "last_error": errored,
            "last_checkpoint": None if last is None else {"seq_from": last.seq_from, "seq_to": last.seq_to,
                                                          "created_at": last.created_at, "key_id": last.key_id},
            "sinks": settings.audit_sinks,
            "delivered_per_sink": per_sink,
        }
    except SQLAlchemyError as exc:
        fail(f"cannot read the audit outbox ({type(exc).__name__}); is the database migrated? "
              "run: compliance db upgrade")
    typer.echo(json.dumps(report))


@app.command("ship")
def audit_ship() -> None:
    """Ship every pending outbox event to the configured sinks now (the gateway also does this by itself)."""
    from compliance.audit.interfaces import AuditSinkUnavailable

    with wiring() as services:
        outbox = services.outbox
        total = 0
        try:
            while (shipped := services.shipper.ship_once()) > 0:
                total += shipped
        except AuditSinkUnavailable as exc:
            fail(f"the audit repository is unavailable: {exc}; {outbox.backlog()} events wait in the outbox")
        typer.echo(json.dumps({"shipped": total, "backlog": outbox.backlog()}))


@app.command("verify")
def audit_verify(
    from_seq: int = typer.Option(1, "--from", help="First chain position to check."),
    to_seq: int = typer.Option(None, "--to", help="Last chain position to check (default: all shipped)."),
    public_key: Path = typer.Option(None, help="Checkpoint verification key (PEM; default: the "  # noqa: B008
                                    "configured checkpoint key)."),
) -> None:
    """Check the audit trail in Elasticsearch against its hash chain: 'intact' or the first broken place.

    Exit status 0 when intact, 1 when anything was modified, deleted, inserted or reordered, or a
    signed checkpoint does not match. The check is itself recorded as a 110101 Audit Log Used event.
    """
    with wiring() as services:
        _verify(services, from_seq, to_seq, public_key)


def _verify(services: Wiring, from_seq: int, to_seq: int | None, public_key: Path | None) -> None:
    from compliance.audit.checkpoints import load_public_key
    from compliance.audit.codes import Outcome
    from compliance.audit.events import audit_log_used_event
    from compliance.audit.interfaces import AuditSinkUnavailable
    from compliance.audit.verify import verify_repository

    settings = services.settings
    try:
        client = services.elasticsearch
    except ConfigurationError as exc:
        fail(exc.message)
    key_path = public_key or settings.effective_checkpoint_key_file
    key = load_public_key(key_path) if key_path.is_file() else None
    if key is None:
        typer.echo(f"warning: no checkpoint key at {key_path}: signed checkpoints are not checked", err=True)
    try:
        result = verify_repository(client, settings.audit_index_prefix, services.outbox, from_seq=from_seq,
                                   to_seq=to_seq, public_key=key, engine=services.engine)
    except AuditSinkUnavailable as exc:
        fail(str(exc))
    services.recorder.record_now(audit_log_used_event(
        user=operator(),
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


@app.command("checkpoint")
def audit_checkpoint() -> None:
    """Sign checkpoints over every recorded event not yet covered, and publish them to Elasticsearch."""
    from compliance.audit.checkpoints import SqlCheckpointStore

    with wiring() as services:
        checkpointer = services.checkpointer
        if checkpointer is None:
            fail(f"no checkpoint key at {services.settings.effective_checkpoint_key_file}: "
                 "run compliance audit keygen")
        checkpointer.tick(force=True)
        if checkpointer.last_error:
            fail(f"checkpoint failed: {checkpointer.last_error}")
        last = SqlCheckpointStore(services.engine).last()
    typer.echo(json.dumps(None if last is None else {"seq_from": last.seq_from, "seq_to": last.seq_to,
                                                     "merkle_root": last.merkle_root, "key_id": last.key_id}))


@app.command("keygen")
def audit_keygen(
    path: Path = typer.Option(None, help="Where to write the key (default from settings)."),  # noqa: B008
) -> None:
    """Create the Ed25519 checkpoint signing key (PKCS#8 PEM, mode 0600); never overwrites one."""
    from compliance.audit.checkpoints import generate_key_file, key_id_of, load_public_key

    target = path or get_settings().effective_checkpoint_key_file
    if target.exists():
        fail(f"{target} exists; a checkpoint key is never overwritten")
    generate_key_file(target)
    typer.echo(f"checkpoint key {key_id_of(load_public_key(target))} written to {target}")


@app.command("prune")
def audit_prune(
    before: str = typer.Option(None, help="Only months before YYYY.MM (refused if within retention)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be deleted; delete nothing."),
) -> None:
    """Delete whole monthly audit indices past retention (policies/retention.yaml) and not under a legal hold.

    Exit 0 when everything asked for was deleted; 1 when some indices were kept (legal hold), naming
    them; 2 when ``--before`` reaches into the retention period (nothing is deleted then).
    """
    from compliance.audit.retention import RetentionPolicy

    settings = get_settings()
    policy = RetentionPolicy.from_file(settings.retention_policy_file)
    if before is not None and not (len(before) == 7 and before[4] == "." and before.replace(".", "").isdigit()):
        fail(f"--before must be YYYY.MM, got {before!r}", 2)
    with wiring() as services:
        _prune(services, policy, before, dry_run)


def _prune(services: Wiring, policy: RetentionPolicy, before: str | None, dry_run: bool) -> None:
    from datetime import UTC, datetime

    from elasticsearch import ApiError, TransportError

    from compliance.audit.codes import Action, Outcome
    from compliance.audit.events import audit_log_used_event
    from compliance.audit.retention import plan_prune

    settings = services.settings
    prefix = settings.audit_index_prefix
    try:
        client = services.elasticsearch
    except ConfigurationError as exc:
        fail(exc.message)
    try:
        indices = list(client.indices.get(index=f"{prefix}-*", allow_no_indices=True, ignore_unavailable=True))

        def patients_in(index: str, ids: list[str]) -> int:
            mapping: dict[str, Any] = dict(client.indices.get_field_mapping(index=index, fields="patient.ids"))
            fields: Any = mapping
            for key in (index, "mappings", "patient.ids", "mapping"):
                fields = fields.get(key) or {} if isinstance(fields, dict) else {}
            first: dict[str, Any] = next(iter(fields.values()), {}) if fields else {}
            kind = first.get("type")
            if kind not in (None, "keyword"):
                # A text field would not match IDs exactly: refuse rather than risk deleting a held record.
                return -1
            return int(client.count(index=index, query={"terms": {"patient.ids": ids}})["count"])

        plan = plan_prune(indices, prefix, policy, now=datetime.now(UTC), before=before, patients_in=patients_in)
    except (ApiError, TransportError) as exc:
        fail(f"cannot read the audit repository: {exc}")
    within = {i: r for i, r in plan.refused.items() if r.startswith("within retention")}
    if within:
        for index, reason in within.items():
            typer.echo(f"refused {index}: {reason}", err=True)
        fail(f"refusing to prune before {before}: it reaches into the {policy.years}-year retention period; "
              "nothing was deleted", 2)
    for index, reason in plan.refused.items():
        typer.echo(f"kept {index}: {reason}", err=True)
    if dry_run:
        typer.echo(json.dumps({"would_delete": plan.deletable, "kept": plan.refused}))
        raise typer.Exit(1 if plan.refused else 0)
    if plan.deletable:
        # Recorded (durably, fail closed) before anything is deleted.
        event = audit_log_used_event(
            user=operator(), gateway_id=settings.audit_source_id, outcome=Outcome.SUCCESS,
            audit_log_uri=f"{settings.elasticsearch_url}/{prefix}-*",
            query=("prune " + ",".join(plan.deletable)).encode(),
            outcome_description=f"deleted {len(plan.deletable)} monthly audit indices past the "
                                f"{policy.years}-year retention")
        services.recorder.record_now(dataclasses.replace(event, action=Action.DELETE))
        try:
            for index in plan.deletable:
                client.indices.delete(index=index)
        except (ApiError, TransportError) as exc:
            fail(f"deleting {index} failed: {exc}")
    typer.echo(json.dumps({"deleted": plan.deletable, "kept": plan.refused}))
    if plan.refused:
        raise typer.Exit(1)
