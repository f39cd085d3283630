"""Liveness and readiness. Unauthenticated on purpose; they disclose no PHI."""

from __future__ import annotations

from fastapi import APIRouter, Request

from compliance.api.models import Liveness, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> Liveness:
    return Liveness(status="ok")


@router.get("/readyz")
async def readyz(request: Request) -> Readiness:
    shipper = getattr(request.app.state, "shipper", None)
    if shipper is None:
        return Readiness(status="ok", audit_shipper=None)
    return Readiness(status="ok", audit_shipper="degraded" if shipper.last_error else "ok")
