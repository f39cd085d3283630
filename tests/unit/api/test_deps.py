"""The one permission guard (compliance.api.deps.RequirePermission): what it asks the policy and what
a refusal's 110113 alert says (the action and the resource), for the default action and for a
route's phrase with its path parameters filled in."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI

from compliance.api import deps
from compliance.api.deps import RequirePermission, authenticate
from compliance.auth.interfaces import Principal

PRIYA = Principal(subject="sub-priya", username="priya", client_id="compliance-web", roles=frozenset({"po"}),
                  groups=())


@pytest.fixture
def enforced(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """The calls the guard makes to compliance.policy.enforce.enforce (which audits and raises)."""
    calls: list[dict[str, object]] = []

    async def enforce(policy: object, auditor: object, principal: Principal, permission: str,
                      **kwargs: object) -> None:
        calls.append({"principal": principal, "permission": permission, **kwargs})

    monkeypatch.setattr(deps, "enforce", enforce)
    return calls


def app_with_guards() -> FastAPI:
    app = FastAPI()
    app.state.services = SimpleNamespace(policy=object(), auditor=object(),
                                         settings=SimpleNamespace(audit_source_id="gw-1"))
    app.dependency_overrides[authenticate] = lambda: PRIYA

    @app.get("/api/v1/audit/reports/{kind}")
    async def report(kind: str, principal: Annotated[Principal, Depends(
            RequirePermission("audit:reports:run", "run the {kind} report"))]) -> dict[str, str]:
        return {"user": principal.username}

    @app.get("/metrics")
    async def metrics(principal: Annotated[Principal, Depends(RequirePermission("system:status:read"))]) -> str:
        return principal.username

    return app


async def get(app: FastAPI, path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("10.0.0.7", 5000)),
                                 base_url="http://gw") as client:
        return await client.get(path)


async def test_a_routes_phrase_names_its_path_parameters(enforced):
    response = await get(app_with_guards(), "/api/v1/audit/reports/patient-access")
    assert response.status_code == 200 and response.json() == {"user": "priya"}
    assert enforced == [{"principal": PRIYA, "permission": "audit:reports:run",
                         "action": "run the patient-access report",
                         "resource": "api:/api/v1/audit/reports/patient-access", "source_address": "10.0.0.7",
                         "gateway_id": "gw-1"}]


async def test_the_default_action_is_the_method_and_the_path(enforced):
    assert (await get(app_with_guards(), "/metrics")).status_code == 200
    assert [(c["action"], c["resource"]) for c in enforced] == [("GET /metrics", "api:/metrics")]
