"""What operators read: Prometheus text metrics (the audit outbox backlog and the chain head; no PHI,
counts only) and the OpenAPI description of the API. Both need a bearer token with
``system:status:read`` (policies/rbac.yaml: the admin role); a Prometheus scraper is given one.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from compliance.api.deps import StatusReader
from compliance.audit.fanout import FanOutAuditSink
from compliance.audit.interfaces import AuditSink
from compliance.audit.outbox import SqlAuditOutbox
from compliance.audit.shipper import AuditShipper

router = APIRouter(tags=["health"])


@router.get("/api/openapi.json", include_in_schema=False)
async def openapi(request: Request, _reader: StatusReader) -> dict[str, Any]:
    """The API description (FastAPI's own route is off: it answered anyone)."""
    app: FastAPI = request.app
    return app.openapi()


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request, _reader: StatusReader) -> str:
    outbox: SqlAuditOutbox = request.app.state.outbox
    shipper: AuditShipper = request.app.state.shipper
    checkpointer = shipper.checkpointer

    def read() -> tuple[int, int, int, int]:
        last = checkpointer.store.last() if checkpointer is not None else None
        return outbox.total(), outbox.backlog(), outbox.chain_head()[0], last.seq_to if last else 0

    recorded, backlog, head, checkpointed = await run_in_threadpool(read)
    up = 0 if shipper.last_error else 1
    return (
        "# HELP compliance_audit_outbox_recorded Audit events recorded in the outbox.\n"
        "# TYPE compliance_audit_outbox_recorded gauge\n"
        f"compliance_audit_outbox_recorded {recorded}\n"
        "# HELP compliance_audit_outbox_backlog Audit events not yet delivered to the repository.\n"
        "# TYPE compliance_audit_outbox_backlog gauge\n"
        f"compliance_audit_outbox_backlog {backlog}\n"
        "# HELP compliance_audit_chain_head_seq Position of the last event in the hash chain.\n"
        "# TYPE compliance_audit_chain_head_seq gauge\n"
        f"compliance_audit_chain_head_seq {head}\n"
        "# HELP compliance_audit_shipper_up 1 when the last shipping attempt reached the repository.\n"
        "# TYPE compliance_audit_shipper_up gauge\n"
        f"compliance_audit_shipper_up {up}\n"
        "# HELP compliance_audit_checkpoint_seq Last chain position covered by a signed checkpoint.\n"
        "# TYPE compliance_audit_checkpoint_seq gauge\n"
        f"compliance_audit_checkpoint_seq {checkpointed}\n"
        "# HELP compliance_audit_checkpoint_up 1 when checkpoints are signed and the last attempt succeeded.\n"
        "# TYPE compliance_audit_checkpoint_up gauge\n"
        f"compliance_audit_checkpoint_up {int(checkpointer is not None and not checkpointer.last_error)}\n"
        + _sink_lines(shipper.sink)
    )


def _sink_lines(sink: AuditSink) -> str:
    """Per-sink health when several sinks are configured (``FanOutAuditSink.errors``)."""
    if not isinstance(sink, FanOutAuditSink):
        return ""
    errors = sink.errors
    lines = ["# HELP compliance_audit_sink_up 1 when the sink's last delivery attempt succeeded.\n",
             "# TYPE compliance_audit_sink_up gauge\n"]
    lines += [f'compliance_audit_sink_up{{sink="{name}"}} {0 if error else 1}\n' for name, error in errors.items()]
    return "".join(lines)
