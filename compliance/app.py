"""create_app(settings): wiring only. Every backend is built here once, at start-up."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import cast

import httpx
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
from compliance.audit.atna import AuditSource
from compliance.audit.checkpoints import build_checkpointer
from compliance.audit.es_client import elasticsearch_client
from compliance.audit.events import application_activity_event
from compliance.audit.fanout import build_audit_sink
from compliance.audit.interfaces import AuditSink
from compliance.audit.outbox import SqlAuditOutbox
from compliance.audit.recorder import AuditRecorder
from compliance.audit.reports import AuditReadServices
from compliance.audit.shipper import AuditShipper
from compliance.auth.interfaces import TokenVerifier
from compliance.auth.tokens import JwksCache, OidcTokenVerifier
from compliance.config import Settings, get_settings
from compliance.db.session import make_engine
from compliance.dicomweb.interfaces import ArchiveBackend
from compliance.dicomweb.orthanc import OrthancArchive
from compliance.dicomweb.service import DicomwebService
from compliance.policy.rbac import RbacPolicy
from compliance.wiring import Services

log = logging.getLogger(__name__)

@dataclass
class Overrides:
    """Backends a test may substitute (a unit test of pure logic only; never an end-to-end test)."""

    verifier: TokenVerifier | None = None
    archive: ArchiveBackend | None = None
    sink: AuditSink | None = None

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


def create_app(settings: Settings | None = None, overrides: Overrides | None = None) -> FastAPI:
    settings = settings or get_settings()
    overrides = overrides or Overrides()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.effective_database_url)
        outbox = SqlAuditOutbox(engine)
        source = AuditSource(source_id=settings.audit_source_id,
                             enterprise_site_id=settings.audit_enterprise_site_id)
        auditor = AuditRecorder(outbox, source, fail_closed=settings.audit_fail_closed)
        # One Elasticsearch client (TLS and credentials from the settings, compliance/audit/es_client.py)
        # and its connection pool for the sink, its checkpoints and the privacy officer's reads.
        es = elasticsearch_client(settings)
        sink = overrides.sink or build_audit_sink(settings, engine, es_client=es)
        shipper = AuditShipper(outbox, sink, batch_size=settings.audit_ship_batch_size,
                               interval_seconds=settings.audit_ship_interval_seconds,
                               max_backoff_seconds=settings.audit_ship_max_backoff_seconds,
                               checkpointer=build_checkpointer(settings, engine, sink))
        http = httpx.AsyncClient(timeout=5.0)
        verifier = overrides.verifier or OidcTokenVerifier(
            issuer=settings.oidc_issuer,
            audience=settings.oidc_audience,
            jwks=JwksCache(settings.effective_jwks_url, client=http,
                           min_refresh_seconds=settings.oidc_jwks_min_refresh_seconds,
                           max_age_seconds=settings.oidc_jwks_max_age_seconds),
            allowed_clients=settings.oidc_allowed_clients,
            algorithms=settings.oidc_algorithms,
            leeway_seconds=settings.oidc_leeway_seconds,
        )
        archive = overrides.archive or OrthancArchive(
            settings.archive_url,
            settings.archive_dicomweb_path,
            username=settings.archive_username,
            password=settings.archive_password.get_secret_value(),
            timeout=settings.archive_timeout_seconds,
            max_connections=settings.archive_max_connections,
            public_host=settings.effective_public_address,
        )
        policy = RbacPolicy.from_file(settings.rbac_policy_file)
        archive_keys = shred_requests = None
        if settings.archive_encrypted:
            from compliance.archive.client import ArchiveKeyClient
            from compliance.archive.operations import KeyOperations
            from compliance.archive.shred import build_shred_requests

            archive_keys = KeyOperations(
                ArchiveKeyClient(settings.archive_url, username=settings.archive_username,
                                 password=settings.archive_password.get_secret_value(),
                                 dicomweb_path=settings.archive_dicomweb_path,
                                 client=cast(OrthancArchive, archive).http_client),
                auditor, gateway_id=settings.audit_source_id)
            shred_requests = build_shred_requests(settings, engine, archive_keys, auditor)
        dicomweb = DicomwebService(archive, policy, auditor, gateway_id=settings.audit_source_id,
                                   qido_max_response_bytes=settings.qido_max_response_bytes,
                                   stow_max_sequence_depth=settings.stow_max_sequence_depth,
                                   erasure=archive_keys.client if archive_keys else None,
                                   archive_dicomweb_path=settings.archive_dicomweb_path)
        from compliance.exports.workers import InProcessWorker, build_export_components, build_queue

        exports = build_export_components(settings, engine, auditor, queue=build_queue(settings))
        export_worker = (InProcessWorker(exports, interval_seconds=settings.exports_poll_interval_seconds)
                         if settings.exports_worker_backend == "inprocess" else None)
        app.state.services = Services(settings=settings, verifier=verifier, auditor=auditor, dicomweb=dicomweb,
                                      policy=policy,
                                      audit_read=AuditReadServices.from_settings(
                                          settings, engine=engine, client=es.options(request_timeout=30)),
                                      exports=exports, archive_keys=archive_keys, shred_requests=shred_requests)
        app.state.outbox = outbox
        app.state.shipper = shipper
        auditor.record_now(application_activity_event("start", gateway_id=settings.audit_source_id))
        if settings.audit_shipper_enabled:
            shipper.start()
        if export_worker is not None:
            export_worker.start()
        try:
            yield
        finally:
            try:
                auditor.record_now(application_activity_event("stop", gateway_id=settings.audit_source_id))
            finally:
                if export_worker is not None:
                    export_worker.stop()
                if settings.audit_shipper_enabled:
                    shipper.stop()
                outbox.close()
                if app.state.services.audit_read is not None:
                    app.state.services.audit_read.close()
                await archive.aclose()
                if archive_keys is not None:
                    await archive_keys.client.aclose()
                await http.aclose()
                es.close()
                engine.dispose()

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
