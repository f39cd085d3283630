"""The DICOMweb fast lane (GatewayApp -> compliance.api.dicomweb.serve_get) answers exactly as the
FastAPI stack did: the app's exception handlers, JSON for anything unexpected, other requests untouched.

Pure ASGI logic: the DICOMweb handler is replaced by one that raises or answers as each test needs
(the real handler, with Keycloak and Orthanc, is tested end to end in tests/integration).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from compliance.api import dicomweb as dicomweb_routes
from compliance.api import errors as error_handlers
from compliance.app import GatewayApp
from compliance.errors import AuthenticationError, NotFound


def app_answering(monkeypatch: pytest.MonkeyPatch, handler) -> GatewayApp:
    app = GatewayApp()
    error_handlers.install(app, realm="imaging")

    @app.post("/dicom-web/{path:path}")
    async def post(path: str) -> dict:
        return {"posted": path}

    monkeypatch.setattr(dicomweb_routes, "dicomweb_get", handler)
    return app


async def get(app: GatewayApp, path: str, method: str = "GET") -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        return await client.request(method, path)


async def test_the_lane_hands_the_path_and_the_query_to_the_handler(monkeypatch):
    seen = {}

    async def handler(request: Request) -> Response:
        seen.update(path=request.path_params["path"], app=request.app, query=request.scope["query_string"])
        return Response(b"ok", headers={"content-type": "application/dicom+json"})

    app = app_answering(monkeypatch, handler)
    r = await get(app, "/dicom-web/studies/1.2.3/series?includefield=all")
    assert (r.status_code, r.content, r.headers["content-type"]) == (200, b"ok", "application/dicom+json")
    assert seen == {"path": "studies/1.2.3/series", "app": app, "query": b"includefield=all"}


async def test_compliance_errors_get_the_apps_json_answers(monkeypatch):
    async def unauthenticated(request: Request) -> Response:
        raise AuthenticationError("no bearer token", reason="missing_token")

    r = await get(app_answering(monkeypatch, unauthenticated), "/dicom-web/studies")
    assert r.status_code == 401 and r.headers["www-authenticate"] == 'Bearer realm="imaging"'
    assert r.json() == {"error": "unauthenticated", "message": "no bearer token"}

    async def missing(request: Request) -> Response:
        raise NotFound("no DICOMweb resource at /dicom-web/nope")

    r = await get(app_answering(monkeypatch, missing), "/dicom-web/nope")
    assert (r.status_code, r.json()["error"]) == (404, "not_found")


async def test_an_unexpected_error_is_a_json_500(monkeypatch):
    async def broken(request: Request) -> Response:
        raise RuntimeError("bug")

    r = await get(app_answering(monkeypatch, broken), "/dicom-web/studies")
    assert r.status_code == 500
    assert r.json() == {"error": "internal_error", "message": "internal server error"}
    assert "bug" not in r.text


async def test_a_body_failing_before_it_starts_is_a_json_500_and_after_it_started_the_connection_breaks(monkeypatch):
    async def fails_at_once() -> AsyncIterator[bytes]:
        raise RuntimeError("upstream broke")
        yield b""  # pragma: no cover

    class FailsBeforeStart(Response):
        async def __call__(self, scope, receive, send) -> None:
            raise RuntimeError("upstream broke before the status")

    async def before(request: Request) -> Response:
        return FailsBeforeStart()

    r = await get(app_answering(monkeypatch, before), "/dicom-web/studies/1/series/2/instances/3")
    assert r.status_code == 500 and r.json()["error"] == "internal_error"

    async def after(request: Request) -> Response:
        return StreamingResponse(fails_at_once(), media_type="application/dicom")

    with pytest.raises(RuntimeError, match="upstream broke"):  # never a second status after the first
        await get(app_answering(monkeypatch, after), "/dicom-web/studies/1/series/2/instances/3")


async def test_other_methods_and_paths_go_through_fastapi(monkeypatch):
    calls = []

    async def handler(request: Request) -> Response:
        calls.append(request.method)
        return Response(b"lane")

    app = app_answering(monkeypatch, handler)
    assert (await get(app, "/dicom-web/studies", "POST")).json() == {"posted": "studies"}
    assert (await get(app, "/elsewhere")).status_code == 404
    assert calls == []
