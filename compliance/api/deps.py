"""Request dependencies: the wired services and the authenticated principal."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from compliance.audit.events import EventTypeCode, Outcome, security_alert_event
from compliance.auth.interfaces import Principal
from compliance.auth.tokens import unverified_username
from compliance.errors import AuthenticationError
from compliance.policy.enforce import enforce
from compliance.wiring import Services


async def get_services(request: Request) -> Services:
    # async on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop on
    # every request for an attribute read.
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def client_address(request: Request) -> str | None:
    """The client's address as the edge settled it (compliance/api/edge.py): the TCP peer, or the
    address the nginx front names next to its secret. Never a header the client wrote itself."""
    return request.client.host if request.client else None


#: Where the edge (compliance/api/edge.py) keeps the principal it authenticated before any body was read.
PRINCIPAL_SCOPE_KEY = "compliance.principal"


async def authenticate(request: Request, services: ServicesDep) -> Principal:
    """Verify the bearer token; audit every refusal as a 110113 Security Alert (authentication decision).

    Done once per request: the edge authenticates before the body is read and keeps the principal
    in the ASGI scope, where this dependency finds it."""
    known = request.scope.get(PRINCIPAL_SCOPE_KEY)
    if known is not None:
        return known  # type: ignore[no-any-return]
    header = request.headers.get("authorization")
    token: str | None = None
    try:
        if not header:
            raise AuthenticationError("a bearer token is required", reason="missing_token")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("the Authorization header must be 'Bearer <token>'", reason="invalid_request")
        return await services.verifier.verify(token)
    except AuthenticationError as exc:
        await services.auditor.record(
            security_alert_event(
                user=None,
                gateway_id=services.settings.audit_source_id,
                alert_type=EventTypeCode.AUTHENTICATION_DECISION,
                description=f"refused credentials for {request.method} {request.url.path}: {exc.message}",
                resource=str(request.url.path),
                outcome=Outcome.MINOR_FAILURE,
                source_address=client_address(request),
                alternative_user_id=unverified_username(token) if token else None,
            )
        )
        raise


CurrentPrincipal = Annotated[Principal, Depends(authenticate)]


class RequirePermission:
    """A dependency: the authenticated principal, once the policy grants it ``permission``; otherwise
    403 and a 110113 alert (``compliance.policy.enforce``).
    Used as ``Annotated[Principal, Depends(RequirePermission("..."))]``."""

    def __init__(self, permission: str) -> None:
        self.permission = permission

    async def __call__(self, request: Request, principal: CurrentPrincipal, services: ServicesDep) -> Principal:
        path = request.url.path
        await enforce(services.policy, services.auditor, principal, self.permission,
                      action=f"{request.method} {path}", resource=f"api:{path}",
                      source_address=client_address(request), gateway_id=services.settings.audit_source_id)
        return principal


#: Status for operators (metrics, the API description): ``system:status:read`` (the admin role).
StatusReader = Annotated[Principal, Depends(RequirePermission("system:status:read"))]
