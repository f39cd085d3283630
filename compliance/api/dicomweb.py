"""DICOMweb routes under ``/dicom-web``: QIDO-RS, WADO-RS and STOW-RS through the gateway."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send

from compliance.api.deps import CurrentPrincipal, Services, ServicesDep, authenticate, client_address
from compliance.api.errors import error_response
from compliance.auth.interfaces import Principal
from compliance.dicomweb.front import FRONT_HEADER, RELEASED_EVENT_HEADER, is_front, released_event
from compliance.dicomweb.interfaces import RequestContext, UpstreamResponse
from compliance.dicomweb.routing import Transaction, classify
from compliance.dicomweb.service import response_headers
from compliance.errors import InvalidRequest, NotFound, PayloadTooLarge, UpstreamError

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dicom-web", tags=["dicomweb"])

#: Retrieve answers up to this size (declared Content-Length) are read whole, then sent.
BUFFERED_RESPONSE_MAX = 1024 * 1024


def _context(request: Request, principal: Principal, path: str, *, front: bool = False) -> RequestContext:
    return RequestContext(
        principal=principal,
        source_address=client_address(request),
        method=request.method,
        path="/" + path,
        query=list(request.query_params.multi_items()),
        raw_query=request.scope.get("query_string", b"").decode("latin-1"),  # what request.url.query holds
        headers={k: v for k, v in request.headers.items()},
        released_event=released_event(request.headers.get(RELEASED_EVENT_HEADER)) if front else None,
    )


async def dicomweb_get(request: Request) -> Response:
    """QIDO-RS and WADO-RS. A plain Starlette route (registered below), not a FastAPI one: the hot
    path does its two look-ups itself rather than through dependency injection, which cost more CPU
    than the rest of a released retrieve's routing (docs/benchmarks/gateway-overhead.md)."""
    if request.method != "GET":
        # Starlette answers HEAD on a GET route; DICOMweb does not need it, and it would be audited as
        # a query or a transfer that sent nothing. Refused as the FastAPI route refused it.
        raise StarletteHTTPException(405, "Method Not Allowed", headers={"Allow": "GET, POST"})
    path: str = request.path_params["path"]
    services: Services = request.app.state.services
    principal = await authenticate(request, services)
    route = classify("GET", "/" + path)
    if route is None:
        raise NotFound(f"no DICOMweb resource at /dicom-web/{path}")
    settings = services.settings
    front = is_front(request.headers.get(FRONT_HEADER), settings.front_secret.get_secret_value())
    ctx = _context(request, principal, path, front=front)
    service = services.dicomweb
    if route.transaction is Transaction.SEARCH:
        result = await service.search(ctx, route)
        if result.status_code >= 400:
            _raise_for_upstream(result.status_code, path)
        return Response(result.body, status_code=result.status_code, headers=result.headers)
    if (route.transaction is Transaction.RETRIEVE and settings.retrieve_delegation and front
            and ctx.released_event is None):
        # Decided and audited here; the nginx front streams the bytes (compliance/dicomweb/front.py).
        # A hand-back of a release the archive refused is relayed and audited here instead.
        target = await service.release(ctx, route)
        if target is not None:
            return Response(status_code=200, headers={"X-Accel-Redirect": target})
    upstream = await service.retrieve(ctx, route)
    if upstream.status_code >= 400:
        await upstream.aclose()
        _raise_for_upstream(upstream.status_code, path)
    headers = response_headers(upstream)
    length = headers.get("content-length") or headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) <= BUFFERED_RESPONSE_MAX:
        # A small answer is read whole and sent in one piece: no streaming task per response.
        # Anything larger, or of unknown length, is streamed (a 500 MB retrieve is never held).
        try:
            body = await upstream.aread()
        finally:
            await upstream.aclose()
        return Response(body, status_code=upstream.status_code, headers=headers)
    return StreamingResponse(_stream(upstream), status_code=upstream.status_code, headers=headers)


# APIRouter.add_route takes the full path: the router prefix applies to its API routes only.
router.add_route(router.prefix + "/{path:path}", dicomweb_get, methods=["GET"], include_in_schema=False)

#: Paths the fast lane (:func:`serve_get`) takes for GET.
FAST_LANE_PREFIX = router.prefix + "/"


async def serve_get(app: Starlette, scope: Scope, receive: Receive, send: Send) -> None:
    """GET /dicom-web/...: :func:`dicomweb_get` called straight from the app (``GatewayApp``), past
    FastAPI's middleware stack and router, which matched every route of every router in turn and
    cost about a quarter of a released retrieve's CPU in the gateway (docs/benchmarks/gateway-overhead.md).

    What the stack did for this route is done here: the app's exception handlers answer the
    ComplianceError tree and HTTP errors exactly as before (same statuses, bodies and headers); any
    other exception is logged and answered 500 in JSON, as long as no response has started. The
    route stays registered on the router too (HEAD gets its 405 there, and a path outside this lane
    still resolves).
    """
    scope["app"] = app
    scope["path_params"] = {"path": scope["path"][len(FAST_LANE_PREFIX):]}
    request = Request(scope, receive)
    started = False

    async def sender(message: Message) -> None:
        nonlocal started
        if message["type"] == "http.response.start":
            started = True
        await send(message)

    try:
        response = await dicomweb_get(request)
    except Exception as exc:  # noqa: BLE001 - answered by the app's handlers, or 500
        response = await error_response(app, request, exc)
    try:
        await response(scope, receive, sender)
    except Exception as exc:
        if started:
            raise  # the status is sent: the server closes the connection, as behind the stack
        await (await error_response(app, request, exc))(scope, receive, sender)


@router.post("/{path:path}")
async def dicomweb_post(path: str, request: Request, principal: CurrentPrincipal, services: ServicesDep) -> Response:
    route = classify("POST", "/" + path)
    if route is None:
        raise NotFound(f"no DICOMweb resource accepts POST at /dicom-web/{path}")
    ctx = _context(request, principal, path)
    service = services.dicomweb
    await service.authorize(ctx, route)
    limit = services.settings.stow_max_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        exc = _too_large(limit)
        await service.audit_rejected_store(ctx, exc.message)
        raise exc
    result = await service.store(ctx, route, _limited(request, limit))
    if result.status_code >= 400 and result.status_code != 409:
        _raise_for_upstream(result.status_code, path)
    return Response(result.body, status_code=result.status_code, headers=result.headers)


async def _stream(upstream: UpstreamResponse) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    finally:
        await upstream.aclose()


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body is larger than {limit} bytes", detail={"limit_bytes": limit})


async def _limited(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body as it arrives; past ``limit`` bytes the upload is aborted with 413."""
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        yield chunk


def _raise_for_upstream(status: int, path: str) -> None:
    if status == 404:
        raise NotFound(f"the archive holds nothing at /dicom-web/{path}")
    if status in (400, 406, 415):
        # The request was understood by the gateway but refused by the archive as asked
        # (for example an Accept it cannot produce): keep the client-side status.
        raise InvalidRequest(f"the archive refused the request ({status})", detail={"archive_status": status})
    raise UpstreamError(f"the archive answered {status}", detail={"archive_status": status})
