"""The privacy officer's API under ``/api/v1/audit``: search, reports, the alert review queue.

Every route: the bearer token (``CurrentPrincipal``), then the decision (``audit:events:search`` for
searching and the review queue, ``audit:reports:run`` for reports; a denial is 403 and a 110113
alert, :class:`compliance.api.deps.RequirePermission`), then the read, then a 110101 Audit Log Used event
naming who asked and what (the query as its "Query" detail), recorded durably before the answer
leaves. A read that fails (bad cursor, Elasticsearch down) is recorded too, with a failure outcome.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Annotated, Literal, TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from compliance.api.deps import RequirePermission, Services, ServicesDep, client_address
from compliance.api.models import AuditEventPage, ReviewItem, ReviewQueuePage
from compliance.audit.codes import Outcome
from compliance.audit.events import audit_log_used_event
from compliance.audit.queries import MAX_PAGE_SIZE, AuditSearch
from compliance.audit.reports import MEDIA_TYPES, PDF_KINDS, ReportFormat, ReportKind, render
from compliance.auth.interfaces import Principal
from compliance.errors import ComplianceError, Conflict, InvalidRequest, NotFound
from compliance.policy.enforce import user_ref

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])

SEARCH = "audit:events:search"
REPORTS = "audit:reports:run"
REVIEW = "audit:alerts:review"

#: What a read returns (a page, a report), handed back by :func:`_audited` once the read is audited.
ReadResult = TypeVar("ReadResult")

#: The principal, once the policy grants the permission (else 403 and a 110113 alert "denied <action>").
Searcher = Annotated[Principal, Depends(RequirePermission(SEARCH, "search the audit trail"))]
ReportRunner = Annotated[Principal, Depends(RequirePermission(REPORTS, "run the {kind} report"))]
QueueReader = Annotated[Principal, Depends(RequirePermission(SEARCH, "read the audit review queue"))]
Reviewer = Annotated[Principal, Depends(RequirePermission(REVIEW, "review audit alerts"))]


async def _audited(request: Request, principal: Principal, services: Services, query: Mapping[str, object],
                   read: Callable[[], ReadResult], *, log_uri: str | None = None) -> ReadResult:
    """Run ``read`` in a worker thread; record the 110101 event (success or failure) before returning."""
    reader = services.audit_read
    outcome, description = Outcome.SUCCESS, None
    try:
        return await run_in_threadpool(read)
    except ComplianceError as exc:
        outcome, description = _failure_outcome(exc), exc.message[:1000]
        raise
    except Exception:
        outcome, description = Outcome.SERIOUS_FAILURE, "internal error while reading the audit log"
        raise
    finally:
        await _record_read(request, principal, services, query, log_uri or reader.audit_log_uri, outcome,
                           description)


def _failure_outcome(exc: ComplianceError) -> Outcome:
    """The caller's mistake (bad query, unknown or already handled item) is minor; the rest serious."""
    return Outcome.MINOR_FAILURE if isinstance(exc, InvalidRequest | NotFound | Conflict) else Outcome.SERIOUS_FAILURE


async def _record_read(request: Request, principal: Principal, services: Services, query: Mapping[str, object],
                       log_uri: str, outcome: Outcome, description: str | None) -> None:
    text = json.dumps({"request": f"{request.method} {request.url.path}", **query}, sort_keys=True,
                      separators=(",", ":"), default=str)
    await services.auditor.record(audit_log_used_event(
        user=user_ref(principal, client_address(request)),
        gateway_id=services.settings.audit_source_id,
        outcome=outcome,
        audit_log_uri=log_uri,
        query=text.encode("utf-8"),
        outcome_description=description,
    ))


# --------------------------------------------------------------------------- search

Strs = Annotated[list[str] | None, Query()]


@router.get("/events")
async def search_events(
    request: Request,
    principal: Searcher,
    services: ServicesDep,
    user: Strs = None,
    patient: Strs = None,
    study: Strs = None,
    event_type: Strs = None,
    outcome: Annotated[list[int] | None, Query()] = None,
    source_address: Strs = None,
    start: Annotated[datetime | None, Query(alias="from")] = None,
    end: Annotated[datetime | None, Query(alias="to")] = None,
    sort: Literal["asc", "desc"] = "desc",
    size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 100,
    cursor: Annotated[str | None, Query(max_length=2000)] = None,
    include_xml: bool = False,
) -> AuditEventPage:
    """Search the audit trail; page with ``cursor`` = the previous page's ``next_cursor``."""
    reader = services.audit_read
    query = {"params": sorted(request.query_params.multi_items())}

    def read() -> AuditEventPage:
        search = AuditSearch(users=tuple(user or ()), patients=tuple(patient or ()), studies=tuple(study or ()),
                             event_types=tuple(event_type or ()), outcomes=tuple(outcome or ()),
                             source_addresses=tuple(source_address or ()), start=start, end=end)
        page = reader.queries.search(search, size=size, order=sort, cursor=cursor, include_xml=include_xml)
        return AuditEventPage.model_validate({
            "events": page.events, "count": len(page.events), "total": page.total,
            "total_is_exact": page.total_is_exact, "next_cursor": page.next_cursor})

    return await _audited(request, principal, services, query, read)


# --------------------------------------------------------------------------- reports


@router.get("/reports/{kind}")
async def run_report(
    kind: ReportKind,
    request: Request,
    principal: ReportRunner,
    services: ServicesDep,
    patient: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
    user: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
    start: Annotated[datetime | None, Query(alias="from")] = None,
    end: Annotated[datetime | None, Query(alias="to")] = None,
    format: ReportFormat = ReportFormat.JSON,  # noqa: A002 - the public parameter name
) -> Response:
    """One of the four reports as JSON, CSV or (patient access, disclosures) PDF."""
    reader = services.audit_read
    if format is ReportFormat.PDF and kind not in PDF_KINDS:
        raise InvalidRequest(f"PDF is offered for {', '.join(sorted(k.value for k in PDF_KINDS))} only")
    query = {"report": kind.value, "params": sorted(request.query_params.multi_items())}

    def read() -> tuple[bytes, int]:
        report = reader.reports.run(kind, patient=patient, user=user, start=start, end=end)
        return render(report, format), len(report.rows)

    body, rows = await _audited(request, principal, services, query, read)
    headers = {"X-Report-Rows": str(rows), "Cache-Control": "no-store"}
    if format is not ReportFormat.JSON:
        headers["Content-Disposition"] = f'attachment; filename="{kind.value}.{format.value}"'
    return Response(body, media_type=MEDIA_TYPES[format], headers=headers)


# --------------------------------------------------------------------------- review queue


class AlertUpdate(BaseModel):
    status: Literal["acknowledged"]
    note: str | None = Field(default=None, max_length=4000)


@router.get("/alerts")
async def list_alerts(
    request: Request,
    principal: QueueReader,
    services: ServicesDep,
    status: Literal["open", "acknowledged"] | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[int | None, Query(ge=0)] = None,
) -> ReviewQueuePage:
    """The detection findings awaiting (or past) review, oldest first; page with ``after`` = the last id."""
    reader = services.audit_read

    def read() -> ReviewQueuePage:
        items = reader.review.list(status=status, limit=limit, after_id=after)
        return ReviewQueuePage.model_validate({"alerts": [item.to_json_obj() for item in items], "count": len(items),
                                               "next_after": items[-1].id if len(items) == limit else None})

    return await _audited(request, principal, services, {"review_queue": {"status": status, "after": after}},
                          read, log_uri=reader.audit_log_uri + "#review-queue")


@router.post("/alerts/{item_id}")
async def update_alert(
    item_id: int,
    update: AlertUpdate,
    request: Request,
    principal: Reviewer,
    services: ServicesDep,
) -> ReviewItem:
    """Acknowledge a finding (``{"status": "acknowledged", "note": "..."}``); 409 when already acknowledged."""
    reader = services.audit_read
    log_uri = reader.audit_log_uri + "#review-queue"
    # The item (and the events it cites) is read before it changes: the read is durable first, so an
    # acknowledgement is never committed unaudited; a refused one is then recorded with its reason.
    await _record_read(request, principal, services, {"acknowledge": item_id, "step": "requested"}, log_uri,
                       Outcome.SUCCESS, None)

    def write() -> ReviewItem:
        return ReviewItem.model_validate(
            reader.review.acknowledge(item_id, by=principal.username, note=update.note).to_json_obj())

    try:
        item = await run_in_threadpool(write)
    except ComplianceError as exc:
        await _record_read(request, principal, services, {"acknowledge": item_id, "step": "refused"}, log_uri,
                           _failure_outcome(exc), exc.message[:1000])
        raise
    return item
