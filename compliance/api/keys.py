"""Archive key operations for administrators: ``/api/v1/keys/...``, shred requests included.

A shred is never one call: one administrator asks, a different one approves, and a legal hold
refuses (:mod:`compliance.archive.shred` draws the state machine)::

    POST /api/v1/keys/shred-requests              {"patient_id", "reason"}  -> 201 the request
    GET  /api/v1/keys/shred-requests?state=requested|approved|rejected|shredded|all
    GET  /api/v1/keys/shred-requests/{id}
    POST /api/v1/keys/shred-requests/{id}/approve {"comment"?}  a second administrator: the shred runs
    POST /api/v1/keys/shred-requests/{id}/reject  {"comment"}
    POST /api/v1/keys/shred-requests/{id}/execute               an approved shred that did not complete

The patient is named in the JSON body, never in the URL: URLs end up in proxy and access logs.

Every route: the bearer token, then the decision (``keys:kek:manage`` for KEK operations,
``keys:patient:shred`` for shred requests; only the ``admin`` role holds them in
``policies/rbac.yaml``; a denial is 403 and a 110113 alert, :class:`compliance.api.deps.RequirePermission`),
then the operation, audited by
:class:`compliance.archive.operations.KeyOperations` (110113/110129, or 110105 with permanent
erasure for a shred) and :class:`compliance.archive.shred.ShredRequests` (each step and each refusal)
before the answer leaves. 409 when the archive is not encrypted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from compliance.api.deps import RequirePermission, Services, ServicesDep, client_address
from compliance.api.models import (
    ExecutedShred,
    KekStateChange,
    KeyRewrap,
    KeyRotation,
    KeyStatus,
    ShredRequestList,
    ShredRequestView,
)
from compliance.archive.operations import KeyOperations
from compliance.archive.shred import ShredRequests
from compliance.auth.interfaces import Principal
from compliance.errors import Conflict
from compliance.policy.enforce import user_ref

router = APIRouter(tags=["keys"])

MANAGE = "keys:kek:manage"
SHRED = "keys:patient:shred"


#: The principal, once the policy grants the permission (else 403 and a 110113 alert "denied <action>").
KeyStatusReader = Annotated[Principal, Depends(RequirePermission(MANAGE, "keys status"))]
Rotator = Annotated[Principal, Depends(RequirePermission(MANAGE, "keys rotate"))]
Rewrapper = Annotated[Principal, Depends(RequirePermission(MANAGE, "keys rewrap"))]
Retirer = Annotated[Principal, Depends(RequirePermission(MANAGE, "keys retire"))]
Destroyer = Annotated[Principal, Depends(RequirePermission(MANAGE, "keys destroy"))]
ShredAsker = Annotated[Principal, Depends(RequirePermission(SHRED, "ask for a shred"))]
ShredLister = Annotated[Principal, Depends(RequirePermission(SHRED, "list shred requests"))]
ShredReader = Annotated[Principal, Depends(RequirePermission(SHRED, "read a shred request"))]
ShredApprover = Annotated[Principal, Depends(RequirePermission(SHRED, "approve a shred"))]
ShredRejecter = Annotated[Principal, Depends(RequirePermission(SHRED, "reject a shred"))]
ShredExecutor = Annotated[Principal, Depends(RequirePermission(SHRED, "execute an approved shred"))]


_NOT_ENCRYPTED = "the archive is not encrypted (COMPLIANCE_ARCHIVE_ENCRYPTED is false)"


def _key_operations(services: Services) -> KeyOperations:
    """The archive's key operations; 409 when the archive is not encrypted (checked after the permission)."""
    if services.archive_keys is None:
        raise Conflict(_NOT_ENCRYPTED)
    return services.archive_keys


def _shred_requests(services: Services) -> ShredRequests:
    """The two-person shred requests, built with the key operations: 409 as they are when absent."""
    if services.shred_requests is None:
        raise Conflict(_NOT_ENCRYPTED)
    return services.shred_requests


async def _key_operation(request: Request, principal: Principal, services: Services, operation: str,
                         kek_id: str | None = None) -> Mapping[str, object]:
    return await _key_operations(services).key_operation(operation, user_ref(principal, client_address(request)),
                                                         kek_id)


@router.get("/api/v1/keys/status")
async def keys_status(request: Request, principal: KeyStatusReader, services: ServicesDep) -> KeyStatus:
    return KeyStatus.model_validate(await _key_operation(request, principal, services, "status"))


@router.post("/api/v1/keys/rotate")
async def keys_rotate(request: Request, principal: Rotator, services: ServicesDep) -> KeyRotation:
    return KeyRotation.model_validate(await _key_operation(request, principal, services, "rotate"))


@router.post("/api/v1/keys/rewrap")
async def keys_rewrap(request: Request, principal: Rewrapper, services: ServicesDep) -> KeyRewrap:
    return KeyRewrap.model_validate(await _key_operation(request, principal, services, "rewrap"))


@router.post("/api/v1/keys/{kek_id}/retire")
async def keys_retire(kek_id: str, request: Request, principal: Retirer, services: ServicesDep) -> KekStateChange:
    return KekStateChange.model_validate(await _key_operation(request, principal, services, "retire", kek_id))


@router.post("/api/v1/keys/{kek_id}/destroy")
async def keys_destroy(kek_id: str, request: Request, principal: Destroyer, services: ServicesDep) -> KekStateChange:
    return KekStateChange.model_validate(await _key_operation(request, principal, services, "destroy", kek_id))


class ShredRequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patient_id: str = Field(min_length=1, max_length=64, description="The PatientID (0010,0020) to erase.")
    reason: str = Field(min_length=1, max_length=1024, description="Why the patient is erased (on the trail).")


class ShredDecision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    comment: str = Field(default="", max_length=1024, description="Required for a rejection.")


@router.post("/api/v1/keys/shred-requests", status_code=201)
async def request_shred(body: ShredRequestBody, request: Request, principal: ShredAsker,
                        services: ServicesDep) -> ShredRequestView:
    return ShredRequestView.model_validate(await _shred_requests(services).request(
        user_ref(principal, client_address(request)), body.patient_id, body.reason))


@router.get("/api/v1/keys/shred-requests")
async def list_shred_requests(
        principal: ShredLister, services: ServicesDep,
        state: Literal["requested", "approved", "rejected", "shredded", "all"] = Query("requested"),
) -> ShredRequestList:
    requests = await _shred_requests(services).list_requests(None if state == "all" else state)
    return ShredRequestList.model_validate({"requests": requests})


@router.get("/api/v1/keys/shred-requests/{request_id}")
async def get_shred_request(request_id: str, principal: ShredReader, services: ServicesDep) -> ShredRequestView:
    return ShredRequestView.model_validate(await _shred_requests(services).get(request_id))


@router.post("/api/v1/keys/shred-requests/{request_id}/approve")
async def approve_shred(request_id: str, body: ShredDecision, request: Request, principal: ShredApprover,
                        services: ServicesDep) -> ExecutedShred:
    return ExecutedShred.model_validate(await _shred_requests(services).approve(
        request_id, user_ref(principal, client_address(request)), body.comment))


@router.post("/api/v1/keys/shred-requests/{request_id}/reject")
async def reject_shred(request_id: str, body: ShredDecision, request: Request, principal: ShredRejecter,
                       services: ServicesDep) -> ShredRequestView:
    return ShredRequestView.model_validate(await _shred_requests(services).reject(
        request_id, user_ref(principal, client_address(request)), body.comment))


@router.post("/api/v1/keys/shred-requests/{request_id}/execute")
async def execute_shred(request_id: str, request: Request, principal: ShredExecutor,
                        services: ServicesDep) -> ExecutedShred:
    return ExecutedShred.model_validate(await _shred_requests(services).execute(
        request_id, user_ref(principal, client_address(request))))
