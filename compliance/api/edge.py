"""The gateway's HTTP edge: who the client is, that it holds a valid token, and how much it may send,
settled before any route runs (``GatewayApp.__call__`` calls it for every HTTP request).

* **No control characters in the path.** A request whose (decoded) path holds one (``%0A``, ``%0D``,
  ``%00``, ...) is answered 400 before anything else: Starlette's ``{name:path}`` parameter, matched
  with ``$``, silently drops a trailing newline, and no resource of this API has one in its name.
* **The source address** written into audit events is the TCP peer's, unless the request carries the
  nginx front's secret (``X-Compliance-Front``, compliance/dicomweb/front.py): only then is the single
  address nginx writes into ``X-Forwarded-For`` believed. uvicorn's own proxy-header handling, which
  believed ``X-Forwarded-For`` from any loopback client, is off (``compliance serve``).
* **Authentication before any body.** Every request but ``/healthz`` and ``/readyz`` has its bearer
  token verified (and a refusal audited, ``compliance.api.deps.authenticate``) before a byte of its
  body is read: FastAPI reads and parses a route's body before its dependencies run. The principal
  is kept in the ASGI scope, where the route's ``CurrentPrincipal`` finds it. GET under
  ``/dicom-web/`` takes the fast lane, which authenticates first and reads no body.
* **A cap on request bodies.** Every body but STOW-RS (``POST /dicom-web/...``, limited and streamed by
  its own route, ``COMPLIANCE_STOW_MAX_BYTES``) is read here up to ``COMPLIANCE_API_MAX_BODY_BYTES``
  and handed to the route from memory; a declared length over the cap, or a chunked body that
  passes it, is answered 413 without reading further.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from compliance.api.deps import PRINCIPAL_SCOPE_KEY, authenticate
from compliance.api.errors import error_response
from compliance.dicomweb.front import FRONT_HEADER, is_front
from compliance.errors import InvalidRequest, PayloadTooLarge

log = logging.getLogger(__name__)

#: Answered to anyone: liveness and readiness disclose nothing.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
#: STOW-RS bodies are streamed to the archive by their own route, under their own limit.
STOW_PREFIX = "/dicom-web/"

#: C0 controls and DEL, anywhere in the percent-decoded path.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FRONT = FRONT_HEADER.encode("latin-1")
_FORWARDED_FOR = b"x-forwarded-for"
_CONTENT_LENGTH = b"content-length"


@dataclass(frozen=True)
class Edge:
    """What the edge needs from the settings: the front's secret and the body cap."""

    front_secret: str
    max_body_bytes: int

    def screen(self, scope: Scope) -> InvalidRequest | None:
        """Settle the client's address (:meth:`resolve_client`); the error to answer when the path
        itself is unacceptable."""
        self.resolve_client(scope)
        if _CONTROL.search(scope["path"]) is not None:
            return InvalidRequest("the request path contains a control character")
        return None

    async def refuse(self, app: Starlette, scope: Scope, receive: Receive, send: Send, error: Exception) -> None:
        """Answer ``error`` as the app's handlers do (JSON), without reading the body."""
        await _answer(app, Request(scope, receive), error, scope, receive, send)

    def resolve_client(self, scope: Scope) -> None:
        """Replace ``scope["client"]`` by the client nginx names, when the request carries the front's
        secret and exactly one well-formed address; otherwise leave the TCP peer."""
        front: bytes | None = None
        forwarded: list[bytes] = []
        for name, value in scope["headers"]:
            if name == _FRONT:
                if front is not None:
                    return  # nginx sets it once; twice is not the front
                front = value
            elif name == _FORWARDED_FOR:
                forwarded.append(value)
        if front is None or not is_front(front.decode("latin-1"), self.front_secret):
            return
        if len(forwarded) != 1:
            log.warning("a request with the front's secret carries %d X-Forwarded-For headers: the TCP peer "
                        "is recorded", len(forwarded))
            return
        try:
            address = ipaddress.ip_address(forwarded[0].decode("latin-1").strip())
        except ValueError:
            log.warning("a request with the front's secret carries a malformed X-Forwarded-For: the TCP peer "
                        "is recorded")
            return
        scope["client"] = (str(address), 0)

    async def admit(self, app: Starlette, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """Authenticate, then read a capped body. Returns the ``receive`` the app must use, or None
        when the request was answered here (401, 413, or the client went away)."""
        if scope["path"] in PUBLIC_PATHS:
            return receive
        request = Request(scope, receive)
        try:
            scope[PRINCIPAL_SCOPE_KEY] = await authenticate(request, app.state.services)
        except Exception as exc:  # noqa: BLE001 - answered by the app's handlers (401 JSON), or 500
            await _answer(app, request, exc, scope, receive, send)
            return None
        if scope["method"] == "POST" and scope["path"].startswith(STOW_PREFIX):
            return receive
        limit = self.max_body_bytes
        declared = _header(scope, _CONTENT_LENGTH)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _answer(app, request, _too_large(limit), scope, receive, send)
            return None
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body = message.get("body", b"")
            total += len(body)
            if total > limit:
                await _answer(app, request, _too_large(limit), scope, receive, send)
                return None
            chunks.append(body)
            if not message.get("more_body", False):
                break
        return _replay(b"".join(chunks), receive)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body is larger than {limit} bytes (COMPLIANCE_API_MAX_BODY_BYTES)",
                           detail={"limit_bytes": limit})


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read by the edge, then the server's own messages (a later disconnect)."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _answer(app: Starlette, request: Request, exc: Exception, scope: Scope, receive: Receive, send: Send) -> None:
    response = await error_response(app, request, exc)
    await response(scope, receive, send)
