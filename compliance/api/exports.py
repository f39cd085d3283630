"""Research exports under ``/api/v1/exports`` (researchers, data stewards) and dual-control
re-identification under ``/api/v1/exports/reidentifications`` (data stewards).

A request names a registered project (``GET /api/v1/exports/projects``: a researcher's own, a steward
sees all with their members); the service checks the caller's membership from the token's username and
``groups`` claim (``compliance.exports.projects``).

Each route: the token (``CurrentPrincipal``), the permission (``RequirePermission``: a denial is 403
and a 110113 alert), then the service (``compliance.exports.service``) in a worker thread; the service
records the audit event of the step (``compliance.exports.audit`` says which) before answering.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from compliance.api.deps import CurrentPrincipal, RequirePermission, ServicesDep, client_address
from compliance.api.models import (
    ApprovedExport,
    DestinationList,
    ExportRequestList,
    ExportRequestView,
    ProjectList,
    ReidentificationView,
    RevealedReidentification,
)
from compliance.auth.interfaces import Principal
from compliance.exports.requests import NewExport
from compliance.policy.enforce import user_ref

router = APIRouter(prefix="/api/v1/exports", tags=["exports"])


class Cohort(BaseModel):
    study_uids: list[str] = Field(default_factory=list, max_length=10_000)
    filters: dict[str, str] | None = None


class Destination(BaseModel):
    """A destination of the server's allow-list, by name: never a URL (extra keys are refused)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["bundle", "dicomweb"]
    name: str | None = Field(default=None, min_length=1, max_length=64)


class ExportRequestBody(BaseModel):
    project: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    protocol: str = Field(min_length=1, max_length=128, description="protocol or IRB id")
    purpose: str = Field(min_length=1, max_length=256)
    profile: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    cohort: Cohort
    #: "bundle" (download), or {"kind": "dicomweb", "name": "<configured research archive>"}
    destination: Literal["bundle"] | Destination = "bundle"


class Decision(BaseModel):
    comment: str = Field(min_length=1, max_length=2000)


class ReidentificationBody(BaseModel):
    project: str = Field(min_length=1, max_length=64)
    kind: str = Field(min_length=1, max_length=32)
    pseudonym: str = Field(min_length=1, max_length=128)
    reason: str = Field(min_length=1, max_length=2000)


#: Who may do each step: the principal, once the policy grants the permission (else 403 and a 110113
#: alert saying "denied <action>").
Requester = Annotated[Principal, Depends(RequirePermission("exports:request:create", "request an export"))]
Approver = Annotated[Principal, Depends(RequirePermission("exports:request:approve", "approve an export"))]
Rejecter = Annotated[Principal, Depends(RequirePermission("exports:request:approve", "reject an export"))]
Downloader = Annotated[Principal, Depends(RequirePermission("exports:bundle:download-own",
                                                            "download an export bundle"))]
_REIDENTIFY = "exports:pseudonym:reidentify"
ReidentificationRequester = Annotated[Principal, Depends(RequirePermission(_REIDENTIFY,
                                                                           "request a re-identification"))]
ReidentificationApprover = Annotated[Principal, Depends(RequirePermission(_REIDENTIFY,
                                                                          "approve a re-identification"))]
ReidentificationRejecter = Annotated[Principal, Depends(RequirePermission(_REIDENTIFY,
                                                                          "reject a re-identification"))]
ReidentificationRevealer = Annotated[Principal, Depends(RequirePermission(_REIDENTIFY,
                                                                          "reveal a re-identification"))]
_READ_OWN = RequirePermission("exports:request:read-own", "read export requests")


async def _may_read_all(request: Request, principal: CurrentPrincipal, services: ServicesDep) -> bool:
    """True: may read every request (steward); False: own requests only; else 403 (audited)."""
    if services.policy.decide(principal, "exports:request:read", f"api:{request.url.path}").allowed:
        return True
    await _READ_OWN.check(request, principal, services)
    return False


#: Whether the caller reads every export request (steward) or only their own (researcher); 403 otherwise.
MayReadAll = Annotated[bool, Depends(_may_read_all)]


@router.post("", status_code=201)
async def create_export(body: ExportRequestBody, request: Request, principal: Requester,
                        services: ServicesDep) -> ExportRequestView:
    destination: str | Mapping[str, object] = (body.destination if isinstance(body.destination, str)
                                               else body.destination.model_dump(exclude_none=True))
    new = NewExport(project=body.project, protocol=body.protocol, purpose=body.purpose, profile=body.profile,
                    study_uids=tuple(body.cohort.study_uids), filters=body.cohort.filters,
                    destination=destination)
    return ExportRequestView.model_validate(await run_in_threadpool(lambda: services.exports.service.create(
        user_ref(principal, client_address(request)), new, groups=principal.groups)))


@router.get("")
async def list_exports(principal: CurrentPrincipal, may_read_all: MayReadAll, services: ServicesDep,
                       state: Annotated[str | None, Query(max_length=16)] = None) -> ExportRequestList:
    items = await run_in_threadpool(services.exports.service.list, reader_id=principal.subject,
                                    may_read_all=may_read_all, state=state)
    return ExportRequestList.model_validate({"items": items})


# --------------------------------------------------------------------------- destinations, re-identification
# (declared before /{request_id} routes so the literal segments win)

@router.get("/destinations")
async def list_destinations(principal: CurrentPrincipal, may_read_all: MayReadAll,
                            services: ServicesDep) -> DestinationList:
    """Where an export may go: the bundle, and the research archives of the server's allow-list (for a
    researcher, those their projects may use)."""
    service = services.exports.service
    mine = None if may_read_all else [p.id for p in service.projects.of_member(principal.username, principal.groups)]
    bundle = {"name": "bundle", "kind": "bundle", "description": "encrypted zip, downloaded by the requester"}
    return DestinationList.model_validate({"items": [bundle, *service.destinations.public(mine)]})


@router.get("/projects")
async def list_projects(principal: CurrentPrincipal, may_read_all: MayReadAll,
                        services: ServicesDep) -> ProjectList:
    """The registered projects: for a researcher, the open ones they may request for; for a steward, all."""
    registry = services.exports.service.projects
    projects = registry.all() if may_read_all else registry.of_member(principal.username, principal.groups)
    return ProjectList.model_validate({"items": [p.public() for p in projects]})


@router.post("/reidentifications", status_code=201)
async def request_reidentification(body: ReidentificationBody, request: Request,
                                   principal: ReidentificationRequester, services: ServicesDep) -> ReidentificationView:
    return ReidentificationView.model_validate(await run_in_threadpool(
        lambda: services.exports.reidentification.request(
            user_ref(principal, client_address(request)), project=body.project, kind=body.kind,
            pseudonym=body.pseudonym, reason=body.reason)))


@router.post("/reidentifications/{request_id}/approve")
async def approve_reidentification(request_id: str, body: Decision, request: Request,
                                   principal: ReidentificationApprover, services: ServicesDep) -> ReidentificationView:
    return ReidentificationView.model_validate(await run_in_threadpool(
        lambda: services.exports.reidentification.decide(
            request_id, user_ref(principal, client_address(request)), approve=True, comment=body.comment)))


@router.post("/reidentifications/{request_id}/reject")
async def reject_reidentification(request_id: str, body: Decision, request: Request,
                                  principal: ReidentificationRejecter, services: ServicesDep) -> ReidentificationView:
    return ReidentificationView.model_validate(await run_in_threadpool(
        lambda: services.exports.reidentification.decide(
            request_id, user_ref(principal, client_address(request)), approve=False, comment=body.comment)))


@router.post("/reidentifications/{request_id}/reveal")
async def reveal_reidentification(request_id: str, request: Request, principal: ReidentificationRevealer,
                                  services: ServicesDep) -> RevealedReidentification:
    return RevealedReidentification.model_validate(await run_in_threadpool(
        lambda: services.exports.reidentification.reveal(request_id, user_ref(principal, client_address(request)))))


# --------------------------------------------------------------------------- one export request

@router.get("/{request_id}")
async def get_export(request_id: str, principal: CurrentPrincipal, may_read_all: MayReadAll,
                     services: ServicesDep) -> ExportRequestView:
    return ExportRequestView.model_validate(await run_in_threadpool(lambda: services.exports.service.get(
        request_id, reader_id=principal.subject, may_read_all=may_read_all)))


@router.post("/{request_id}/approve")
async def approve_export(request_id: str, body: Decision, request: Request, principal: Approver,
                         services: ServicesDep) -> ApprovedExport:
    return ApprovedExport.model_validate(await run_in_threadpool(lambda: services.exports.service.decide(
        request_id, user_ref(principal, client_address(request)), approve=True, comment=body.comment)))


@router.post("/{request_id}/reject")
async def reject_export(request_id: str, body: Decision, request: Request, principal: Rejecter,
                        services: ServicesDep) -> ExportRequestView:
    return ExportRequestView.model_validate(await run_in_threadpool(lambda: services.exports.service.decide(
        request_id, user_ref(principal, client_address(request)), approve=False, comment=body.comment)))


@router.get("/{request_id}/bundle")
async def download_bundle(request_id: str, request: Request, principal: Downloader,
                          services: ServicesDep) -> StreamingResponse:
    bundle = await run_in_threadpool(lambda: services.exports.service.open_bundle(
        request_id, user_ref(principal, client_address(request)), destination_uri=str(request.url)))
    return StreamingResponse(bundle.chunks, media_type="application/zip", headers={
        "Content-Length": str(bundle.size),
        "Content-Disposition": f'attachment; filename="{bundle.filename}"',
        "X-Content-SHA256": bundle.checksum_sha256,
        "Cache-Control": "no-store",
    })
