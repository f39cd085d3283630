"""create_app(settings): the gateway's ASGI app. Its services come from the composition root
(:class:`compliance.wiring.Wiring`), built once at start-up and released at shutdown."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from compliance import __version__
from compliance.api import audit as audit_routes
from compliance.api import dicomweb as dicomweb_routes
from compliance.api import errors as error_handlers
from compliance.api import exports as export_routes
from compliance.api import health
from compliance.api import metrics as metrics_routes
from compliance.api.edge import Edge
from compliance.audit.events import application_activity_event
from compliance.config import Settings, get_settings
from compliance.exports.workers import InProcessWorker
from compliance.wiring import Role, Wiring

log = logging.getLogger(__name__)


class GatewayApp(FastAPI):
    """The gateway's ASGI app. The edge (:class:`compliance.api.edge.Edge`, set by :func:`create_app`)
    settles the client's address for every request and refuses control characters in its path;
    GET /dicom-web/... then takes the DICOMweb fast lane (:func:`compliance.api.dicomweb.serve_get`),
    which authenticates itself; everything else is authenticated and its body capped by the edge
    before FastAPI reads it."""

    edge: Edge | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if self.edge is not None:
                refused = self.edge.screen(scope)
                if refused is not None:
                    await self.edge.refuse(self, scope, receive, send, refused)
                    return
            if (scope["method"] == "GET" and not self.root_path
                    and scope["path"].startswith(dicomweb_routes.FAST_LANE_PREFIX)):
                await dicomweb_routes.serve_get(self, scope, receive, send)
                return
            if self.edge is not None:
                admitted = await self.edge.admit(self, scope, receive, send)
                if admitted is None:
                    return
                receive = admitted
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        wiring = Wiring(settings, Role.GATEWAY)
        try:
            services = wiring.services()
            export_worker = (InProcessWorker(services.exports, interval_seconds=settings.exports_poll_interval_seconds)
                             if settings.exports_worker_backend == "inprocess" else None)
            app.state.services = services
            app.state.outbox = wiring.outbox
            app.state.shipper = wiring.shipper
            wiring.recorder.record_now(application_activity_event("start", gateway_id=settings.audit_source_id))
        except BaseException:
            await wiring.aclose()
            raise
        if settings.audit_shipper_enabled:
            wiring.shipper.start()
        if export_worker is not None:
            export_worker.start()
        try:
            yield
        finally:
            try:
                wiring.recorder.record_now(application_activity_event("stop", gateway_id=settings.audit_source_id))
            finally:
                if export_worker is not None:
                    export_worker.stop()
                if settings.audit_shipper_enabled:
                    wiring.shipper.stop()
                await wiring.aclose()

    # No docs UI, and the API description is served by compliance/api/metrics.py to operators only.
    app = GatewayApp(title="Imaging compliance gateway", version=__version__, lifespan=lifespan,
                     docs_url=None, openapi_url=None, redoc_url=None)
    app.edge = Edge(front_secret=settings.front_secret.get_secret_value(),
                    max_body_bytes=settings.api_max_body_bytes)
    error_handlers.install(app, realm=settings.keycloak_realm)
    app.include_router(health.router)
    app.include_router(metrics_routes.router)
    app.include_router(dicomweb_routes.router)
    app.include_router(audit_routes.router)
    app.include_router(export_routes.router)
    from compliance.api import keys as key_routes

    app.include_router(key_routes.router)
    return app

def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (one per worker process)."""
    return create_app(get_settings())
