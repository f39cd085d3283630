"""Archive key operations for administrators: ``/api/v1/keys/...``, shredding included.

A shred names the patient in the JSON body (``POST /api/v1/keys/shred {"patient_id": ...}``), never
in the URL: URLs end up in proxy and access logs.

Every route: the bearer token, then the decision (``keys:kek:manage`` for KEK operations,
``keys:patient:shred`` for shredding; only the ``admin`` role holds them in ``policies/rbac.yaml``;
a denial is 403 and a 110113 alert), then the operation in the archive's key custodian, audited by
:class:`compliance.archive.operations.KeyOperations` (110113/110129, or 110105 with permanent
erasure for a shred) before the answer leaves. 409 when the archive is not encrypted.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from compliance.api.deps import CurrentPrincipal, Services, ServicesDep, client_address
from compliance.archive.operations import KeyOperations
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


class ShredRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patient_id: str = Field(min_length=1, max_length=64, description="The PatientID (0010,0020) to erase.")


@router.post("/api/v1/keys/shred")
async def shred_patient(body: ShredRequest, request: Request, principal: CurrentPrincipal,
                        services: ServicesDep) -> dict[str, Any]:
    ops = await _authorized(request, principal, services, SHRED, "shred a patient")
    return await ops.shred_patient(body.patient_id, user_ref(principal, client_address(request)))
