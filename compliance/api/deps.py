"""Request dependencies: the wired services and the authenticated principal."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from compliance.audit.codes import EventTypeCode, Outcome
from compliance.audit.events import security_alert_event
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
    if isinstance(known, Principal):
        return known
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
    """A dependency: the authenticated principal, once the policy grants it ``permission`` on
    ``api:<path>``; otherwise 403 and a 110113 alert (``compliance.policy.enforce``) that says
    ``denied <action>``. Used as ``Annotated[Principal, Depends(RequirePermission("..."))]``.

    ``action`` is what the alert and the 403 say was refused: ``"<METHOD> <path>"`` by default, or a
    phrase of the route's (``"approve an export"``) in which ``{name}`` stands for the path parameter
    ``name`` (``"run the {kind} report"``). Being a dependency, it runs before FastAPI reads and checks
    the route's own parameters and body."""

    def __init__(self, permission: str, action: str | None = None) -> None:
        self.permission = permission
        self.action = action

    async def __call__(self, request: Request, principal: CurrentPrincipal, services: ServicesDep) -> Principal:
        await self.check(request, principal, services)
        return principal

    async def check(self, request: Request, principal: Principal, services: Services) -> None:
        """Return when allowed; otherwise audit the denial and raise ``PermissionDenied``."""
        path = request.url.path
        action = (f"{request.method} {path}" if self.action is None
                  else self.action.format_map(request.path_params))
        await enforce(services.policy, services.auditor, principal, self.permission, action=action,
                      resource=f"api:{path}", source_address=client_address(request),
                      gateway_id=services.settings.audit_source_id)


#: Status for operators (metrics, the API description): ``system:status:read`` (the admin role).
StatusReader = Annotated[Principal, Depends(RequirePermission("system:status:read"))]
