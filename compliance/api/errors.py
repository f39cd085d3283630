"""Answers the ComplianceError tree as HTTP/DICOMweb statuses (``compliance.errors.status_of``) with a JSON body."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException

from compliance import errors as e

log = logging.getLogger(__name__)

status_of = e.status_of


def error_body(code: str, message: str, detail: dict | None = None) -> dict:
    body: dict = {"error": code, "message": message}
    if detail:
        body["detail"] = detail
    return body


def www_authenticate(realm: str, exc: e.AuthenticationError | None) -> str:
    """RFC 6750 section 3: no error attribute when no credentials were sent at all."""
    if exc is None or exc.reason == "missing_token":
        return f'Bearer realm="{realm}"'
    description = exc.message.replace('"', "'")
    return f'Bearer realm="{realm}", error="{exc.reason}", error_description="{description}"'


async def error_response(app: Starlette, request: Request, exc: Exception) -> Response:
    """The app's answer to ``exc`` outside FastAPI's middleware stack (the DICOMweb fast lane and the
    edge, compliance/api/edge.py): its exception handlers (same statuses, bodies and headers), or a
    JSON 500 for anything unexpected."""
    for cls in type(exc).__mro__:
        handler = app.exception_handlers.get(cls)
        if handler is not None:
            response: Response = await handler(request, exc)
            return response
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)


def install(app: FastAPI, *, realm: str) -> None:
    @app.exception_handler(e.ComplianceError)
    async def _compliance_error(_request: Request, exc: e.ComplianceError) -> JSONResponse:
        status = status_of(exc)
        headers = {}
        if isinstance(exc, e.AuthenticationError):
            headers["WWW-Authenticate"] = www_authenticate(realm, exc)
        if status >= 500:
            log.error("%s: %s", type(exc).__name__, exc.message, exc_info=exc.__cause__ is not None)
        return JSONResponse(error_body(exc.code, exc.message, exc.detail), status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("invalid_request", "the request is not valid",
                                       {"errors": exc.errors()}), status_code=400)
