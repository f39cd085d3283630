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
``policies/rbac.yaml``; a denial is 403 and a 110113 alert), then the operation, audited by
:class:`compliance.archive.operations.KeyOperations` (110113/110129, or 110105 with permanent
erasure for a shred) and :class:`compliance.archive.shred.ShredRequests` (each step and each refusal)
before the answer leaves. 409 when the archive is not encrypted.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from compliance.api.deps import CurrentPrincipal, Services, ServicesDep, client_address
from compliance.archive.operations import KeyOperations
from compliance.archive.shred import ShredRequests
from compliance.auth.interfaces import Principal
from compliance.errors import Conflict
from compliance.policy.enforce import enforce, user_ref

router = APIRouter(tags=["keys"])

MANAGE = "keys:kek:manage"
SHRED = "keys:patient:shred"


async def _authorized(request: Request, principal: Principal, services: Services, permission: str,
                      action: str) -> KeyOperations:
    await enforce(services.policy, services.auditor, principal, permission, action=action,
                  resource=f"api:{request.url.path}", source_address=client_address(request),
                  gateway_id=services.settings.audit_source_id)
    if services.archive_keys is None:
        raise Conflict("the archive is not encrypted (COMPLIANCE_ARCHIVE_ENCRYPTED is false)")
    return services.archive_keys  # type: ignore[no-any-return]


async def _key_op(request: Request, principal: Principal, services: Services, op: str,
                  kek_id: str | None = None) -> dict[str, Any]:
    ops = await _authorized(request, principal, services, MANAGE, f"keys {op}")
    return await ops.key_operation(op, user_ref(principal, client_address(request)), kek_id)


@router.get("/api/v1/keys/status")
async def keys_status(request: Request, principal: CurrentPrincipal, services: ServicesDep) -> dict[str, Any]:
    return await _key_op(request, principal, services, "status")


@router.post("/api/v1/keys/rotate")
async def keys_rotate(request: Request, principal: CurrentPrincipal, services: ServicesDep) -> dict[str, Any]:
    return await _key_op(request, principal, services, "rotate")


@router.post("/api/v1/keys/rewrap")
async def keys_rewrap(request: Request, principal: CurrentPrincipal, services: ServicesDep) -> dict[str, Any]:
    return await _key_op(request, principal, services, "rewrap")


@router.post("/api/v1/keys/{kek_id}/retire")
async def keys_retire(kek_id: str, request: Request, principal: CurrentPrincipal,
                      services: ServicesDep) -> dict[str, Any]:
    return await _key_op(request, principal, services, "retire", kek_id)


@router.post("/api/v1/keys/{kek_id}/destroy")
async def keys_destroy(kek_id: str, request: Request, principal: CurrentPrincipal,
                       services: ServicesDep) -> dict[str, Any]:
    return await _key_op(request, principal, services, "destroy", kek_id)


class ShredRequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patient_id: str = Field(min_length=1, max_length=64, description="The PatientID (0010,0020) to erase.")
    reason: str = Field(min_length=1, max_length=1024, description="Why the patient is erased (on the trail).")


class ShredDecision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    comment: str = Field(default="", max_length=1024, description="Required for a rejection.")


async def _shreds(request: Request, principal: Principal, services: Services, action: str) -> ShredRequests:
    await _authorized(request, principal, services, SHRED, action)
    return services.shred_requests  # type: ignore[no-any-return]


@router.post("/api/v1/keys/shred-requests", status_code=201)
async def request_shred(body: ShredRequestBody, request: Request, principal: CurrentPrincipal,
                        services: ServicesDep) -> dict[str, Any]:
    shreds = await _shreds(request, principal, services, "ask for a shred")
    return await shreds.request(user_ref(principal, client_address(request)), body.patient_id, body.reason)


@router.get("/api/v1/keys/shred-requests")
async def list_shred_requests(
        request: Request, principal: CurrentPrincipal, services: ServicesDep,
        state: Literal["requested", "approved", "rejected", "shredded", "all"] = Query("requested")) -> dict[str, Any]:
    shreds = await _shreds(request, principal, services, "list shred requests")
    return {"requests": await shreds.list_requests(None if state == "all" else state)}


@router.get("/api/v1/keys/shred-requests/{request_id}")
async def get_shred_request(request_id: str, request: Request, principal: CurrentPrincipal,
                            services: ServicesDep) -> dict[str, Any]:
    shreds = await _shreds(request, principal, services, "read a shred request")
    return await shreds.get(request_id)


@router.post("/api/v1/keys/shred-requests/{request_id}/approve")
async def approve_shred(request_id: str, body: ShredDecision, request: Request, principal: CurrentPrincipal,
                        services: ServicesDep) -> dict[str, Any]:
    shreds = await _shreds(request, principal, services, "approve a shred")
    return await shreds.approve(request_id, user_ref(principal, client_address(request)), body.comment)


@router.post("/api/v1/keys/shred-requests/{request_id}/reject")
async def reject_shred(request_id: str, body: ShredDecision, request: Request, principal: CurrentPrincipal,
                       services: ServicesDep) -> dict[str, Any]:
    shreds = await _shreds(request, principal, services, "reject a shred")
    return await shreds.reject(request_id, user_ref(principal, client_address(request)), body.comment)


@router.post("/api/v1/keys/shred-requests/{request_id}/execute")
async def execute_shred(request_id: str, request: Request, principal: CurrentPrincipal,
                        services: ServicesDep) -> dict[str, Any]:
    shreds = await _shreds(request, principal, services, "execute an approved shred")
    return await shreds.execute(request_id, user_ref(principal, client_address(request)))
