"""Liveness and readiness. Unauthenticated on purpose; they disclose no PHI."""

from __future__ import annotations

from fastapi import APIRouter, Request

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> dict[str, object]:
    state = request.app.state
    shipper = getattr(state, "shipper", None)
    return {
        "status": "ok",
        "audit_shipper": None if shipper is None else ("degraded" if shipper.last_error else "ok"),
    }
