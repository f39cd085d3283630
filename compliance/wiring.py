"""The composition root: every service is built here, once per process, from one
:class:`~compliance.config.Settings`.

The gateway (:mod:`compliance.app`), the CLIs (:mod:`compliance.cli`) and the export workers
(:mod:`compliance.worker`) each hold one :class:`Wiring` and take what they need from it; a service is
built on first use, so a CLI command that only reads the outbox never connects to Elasticsearch.
No domain module builds another domain's services. :meth:`Wiring.aclose` (or :meth:`Wiring.close` where
nothing asynchronous was built) releases what was built, in reverse order.

The one difference between the kinds of process is :class:`Role`: the gateway records audit events
fail-closed only when ``COMPLIANCE_AUDIT_FAIL_CLOSED`` says so, while a CLI command or a worker always
fails when its event cannot be recorded (an operator action or an export that was never audited did not
happen).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from functools import cached_property
from typing import TYPE_CHECKING

from compliance.archive.operations import KeyOperations
from compliance.archive.shred import ShredRequests
from compliance.audit.recorder import AuditRecorder
from compliance.audit.reports import AuditReadServices
from compliance.auth.interfaces import TokenVerifier
from compliance.config import Settings
from compliance.dicomweb.service import DicomwebService
from compliance.errors import ConfigurationError
from compliance.exports.interfaces import ExportQueue
from compliance.exports.workers import ExportComponents
from compliance.policy.interfaces import PolicyDecisionPoint

if TYPE_CHECKING:
    import httpx
    from elasticsearch import Elasticsearch
    from sqlalchemy import Engine, MetaData

    from compliance.archive.client import ArchiveKeyClient
    from compliance.audit.atna import AuditSource
    from compliance.audit.checkpoints import AuditCheckpointer
    from compliance.audit.elasticsearch import ElasticsearchAuditSink
    from compliance.audit.interfaces import AuditSink
    from compliance.audit.outbox import SqlAuditOutbox
    from compliance.audit.shipper import AuditShipper
    from compliance.dicomweb.orthanc import OrthancArchive

log = logging.getLogger(__name__)


def metadata() -> MetaData:
    """Every domain's tables on the one declarative base (Alembic autogenerate, the migrations test)."""
    from compliance.archive import models as archive_models
    from compliance.audit import models as audit_models
    from compliance.audit import review_models
    from compliance.crypto import models as crypto_models
    from compliance.db.base import Base
    from compliance.exports import models as export_models

    del archive_models, audit_models, review_models, crypto_models, export_models  # imported for their tables
    return Base.metadata


class Role(Enum):
    GATEWAY = "gateway"
    CLI = "cli"
    WORKER = "worker"


@dataclass
class Services:
    """What the API routes use, built once at start-up (:func:`compliance.app.create_app`)."""

    settings: Settings
    verifier: TokenVerifier
    auditor: AuditRecorder
    dicomweb: DicomwebService
    policy: PolicyDecisionPoint
    #: The privacy officer's audit search, reports and review queue (compliance/api/audit.py).
    audit_read: AuditReadServices
    #: Research exports and re-identification.
    exports: ExportComponents
    #: Archive key operations; None when the archive is not encrypted.
    archive_keys: KeyOperations | None = None
    #: Two-person crypto-shred requests; None when the archive is not encrypted.
    shred_requests: ShredRequests | None = None


class Wiring:
    """Each property builds its service on first use and keeps it for the life of the process."""

    def __init__(self, settings: Settings, role: Role) -> None:
        self.settings = settings
        self.role = role

    # -- storage and audit -------------------------------------------------------------------------

    @cached_property
    def engine(self) -> Engine:
        from compliance.db.session import make_engine

        return make_engine(self.settings.effective_database_url)

    @cached_property
    def outbox(self) -> SqlAuditOutbox:
        from compliance.audit.outbox import SqlAuditOutbox

        return SqlAuditOutbox(self.engine)

    @cached_property
    def audit_source(self) -> AuditSource:
        from compliance.audit.atna import AuditSource

        return AuditSource(source_id=self.settings.audit_source_id,
                           enterprise_site_id=self.settings.audit_enterprise_site_id)

    @cached_property
    def recorder(self) -> AuditRecorder:
        """The only way anything records an audit event: into the durable outbox."""
        fail_closed = self.settings.audit_fail_closed if self.role is Role.GATEWAY else True
        return AuditRecorder(self.outbox, self.audit_source, fail_closed=fail_closed)

    @cached_property
    def elasticsearch(self) -> Elasticsearch:
        """One Elasticsearch client (TLS and credentials from the settings) and its connection pool,
        for the sink, the checkpoints and the privacy officer's reads."""
        from compliance.audit.es_client import elasticsearch_client

        return elasticsearch_client(self.settings)

    @cached_property
    def elasticsearch_sink(self) -> ElasticsearchAuditSink:
        from compliance.audit.elasticsearch import ElasticsearchAuditSink

        return ElasticsearchAuditSink(self.settings.elasticsearch_url, self.settings.audit_index_prefix,
                                      client=self.elasticsearch)

    @cached_property
    def sink(self) -> AuditSink:
        """The sink, or the fan-out of sinks, that ``COMPLIANCE_AUDIT_SINKS`` names."""
        from compliance.audit.fanout import FanOutAuditSink, sink_names

        s = self.settings
        sinks: dict[str, AuditSink] = {}
        for name in sink_names(s):
            if name == "elasticsearch":
                sinks[name] = self.elasticsearch_sink
            elif name == "syslog":
                from compliance.audit.syslog import SyslogTlsAuditSink

                if s.audit_syslog_ca_file is None:
                    raise ConfigurationError("the syslog audit sink needs COMPLIANCE_AUDIT_SYSLOG_CA_FILE (TLS only)")
                sinks[name] = SyslogTlsAuditSink(
                    s.audit_syslog_host, s.audit_syslog_port, ca_file=s.audit_syslog_ca_file,
                    cert_file=s.audit_syslog_cert_file, key_file=s.audit_syslog_key_file,
                    server_name=s.audit_syslog_server_name or None, app_name=s.audit_source_id)
        if len(sinks) == 1:
            return next(iter(sinks.values()))
        return FanOutAuditSink(sinks, self.engine)

    @cached_property
    def checkpointer(self) -> AuditCheckpointer | None:
        """Signs the hash chain's checkpoints and publishes them beside the events in Elasticsearch (when it
        is one of the sinks); None, with a warning, without a key in development."""
        from compliance.audit.checkpoints import (
            AuditCheckpointer,
            CheckpointSigner,
            ElasticsearchCheckpoints,
            SqlCheckpointStore,
        )
        from compliance.audit.fanout import sink_names

        s = self.settings
        key_file = s.effective_checkpoint_key_file
        if not key_file.is_file():
            if s.environment != "development":
                raise ConfigurationError(f"the audit checkpoint key {key_file} is missing")
            log.warning("INSECURE: no audit checkpoint key at %s; the hash chain is not signed "
                        "(generate one: compliance audit keygen)", key_file)
            return None
        publish = None
        if "elasticsearch" in sink_names(s):
            publish = ElasticsearchCheckpoints(self.elasticsearch, s.audit_index_prefix).publish
        return AuditCheckpointer(SqlCheckpointStore(self.engine), CheckpointSigner.from_file(key_file),
                                 publish=publish, every_events=s.audit_checkpoint_every_events,
                                 every_seconds=s.audit_checkpoint_every_seconds)

    @cached_property
    def shipper(self) -> AuditShipper:
        from compliance.audit.shipper import AuditShipper

        s = self.settings
        return AuditShipper(self.outbox, self.sink, batch_size=s.audit_ship_batch_size,
                            interval_seconds=s.audit_ship_interval_seconds,
                            max_backoff_seconds=s.audit_ship_max_backoff_seconds, checkpointer=self.checkpointer)

    @cached_property
    def audit_read(self) -> AuditReadServices:
        """The privacy officer's search, reports and review queue."""
        from compliance.audit.queries import AuditQueryService
        from compliance.audit.reports import ReportService
        from compliance.audit.review import SqlReviewQueue

        s = self.settings
        queries = AuditQueryService(self.elasticsearch.options(request_timeout=30), s.audit_index_prefix)
        return AuditReadServices(queries=queries, reports=ReportService(queries, organization=s.organization_name),
                                 review=SqlReviewQueue(self.engine),
                                 audit_log_uri=f"{s.elasticsearch_url.rstrip('/')}/{s.audit_index_prefix}-*")

    # -- identity and policy -----------------------------------------------------------------------

    @cached_property
    def http(self) -> httpx.AsyncClient:
        """The gateway's outbound HTTP client for Keycloak (the realm's JWKS)."""
        import httpx

        return httpx.AsyncClient(timeout=5.0)

    @cached_property
    def verifier(self) -> TokenVerifier:
        from compliance.auth.tokens import JwksCache, OidcTokenVerifier

        s = self.settings
        return OidcTokenVerifier(
            issuer=s.oidc_issuer,
            audience=s.oidc_audience,
            jwks=JwksCache(s.effective_jwks_url, client=self.http, min_refresh_seconds=s.oidc_jwks_min_refresh_seconds,
                           max_age_seconds=s.oidc_jwks_max_age_seconds),
            allowed_clients=s.oidc_allowed_clients,
            algorithms=s.oidc_algorithms,
            leeway_seconds=s.oidc_leeway_seconds,
        )

    @cached_property
    def policy(self) -> PolicyDecisionPoint:
        from compliance.policy.rbac import RbacPolicy

        return RbacPolicy.from_file(self.settings.rbac_policy_file)

    # -- the archive -------------------------------------------------------------------------------

    @cached_property
    def orthanc(self) -> OrthancArchive:
        from compliance.dicomweb.orthanc import OrthancArchive

        s = self.settings
        return OrthancArchive(s.archive_url, s.archive_dicomweb_path, username=s.archive_username,
                              password=s.archive_password.get_secret_value(), timeout=s.archive_timeout_seconds,
                              max_connections=s.archive_max_connections, public_host=s.effective_public_address)

    @cached_property
    def archive_key_client(self) -> ArchiveKeyClient:
        """The archive's key custodian (the Orthanc storage plugin's control routes). In the gateway it
        shares the archive client's connection pool; a CLI command has a client of its own."""
        from compliance.archive.client import ArchiveKeyClient

        s = self.settings
        shared = self.orthanc.http_client if self.role is Role.GATEWAY else None
        return ArchiveKeyClient(s.archive_url, username=s.archive_username,
                                password=s.archive_password.get_secret_value(),
                                dicomweb_path=s.archive_dicomweb_path, client=shared)

    @cached_property
    def key_operations(self) -> KeyOperations:
        """Key operations (status, rotate, rewrap, retire, destroy, shred), audited."""
        return KeyOperations(self.archive_key_client, self.recorder, gateway_id=self.settings.audit_source_id)

    @cached_property
    def shred_requests(self) -> ShredRequests:
        from compliance.db.session import make_session_factory

        return ShredRequests(make_session_factory(self.engine), self.key_operations, self.recorder,
                             gateway_id=self.settings.audit_source_id,
                             retention_policy_file=self.settings.retention_policy_file)

    @property
    def archive_encrypted(self) -> bool:
        """Whether the gateway serves key operations and tells erasure from corruption (the operator's
        CLI talks to the key custodian whatever this says)."""
        return self.settings.archive_encrypted

    @cached_property
    def dicomweb(self) -> DicomwebService:
        s = self.settings
        return DicomwebService(self.orthanc, self.policy, self.recorder, gateway_id=s.audit_source_id,
                               qido_max_response_bytes=s.qido_max_response_bytes,
                               stow_max_sequence_depth=s.stow_max_sequence_depth,
                               erasure=self.archive_key_client if self.archive_encrypted else None,
                               archive_dicomweb_path=s.archive_dicomweb_path)

    # -- research exports --------------------------------------------------------------------------

    @cached_property
    def export_queue(self) -> ExportQueue | None:
        """Where an approval is sent, chosen by ``COMPLIANCE_EXPORTS_WORKER_BACKEND``."""
        from compliance.exports.workers import DramatiqQueue, SqlPollingQueue

        backend = self.settings.exports_worker_backend
        if backend == "dramatiq":
            return DramatiqQueue(self.settings.exports_redis_url)
        if backend == "inprocess":
            return SqlPollingQueue()
        return None

    @cached_property
    def exports(self) -> ExportComponents:
        """The export services; the same in the gateway and in a worker process, so both run the same
        job code and read the same destination allow-list and project registry."""
        from compliance.crypto.providers.local import LocalKeyProvider
        from compliance.db.session import make_session_factory
        from compliance.dicomweb.reader import DicomwebArchiveReader
        from compliance.exports.destinations import load_destinations
        from compliance.exports.jobs import ExportJob
        from compliance.exports.keys import ProjectKeyStore, PseudonymMap
        from compliance.exports.projects import load_projects
        from compliance.exports.recovery import RecoveryPolicy
        from compliance.exports.reidentification import ReidentificationService
        from compliance.exports.service import ExportService

        s = self.settings
        sessions = make_session_factory(self.engine)
        development = s.environment == "development"
        provider = LocalKeyProvider(s.exports_keyring_file or s.stack_dir / "keys" / "exports-keyring.json",
                                    environment=s.environment, explicit_path=s.exports_keyring_file is not None,
                                    create_if_missing=development)
        projects = load_projects(s.exports_projects_file)
        keys = ProjectKeyStore(sessions, provider, create_kek_if_missing=development, registered=projects.is_registered)
        destinations = load_destinations(s.exports_destinations_file, environment=s.environment, projects=projects)
        service = ExportService(sessions, self.recorder, keys, gateway_id=s.audit_source_id, queue=self.export_queue,
                                bundle_ttl=timedelta(hours=s.exports_bundle_ttl_hours), destinations=destinations,
                                recovery=RecoveryPolicy.from_settings(s), projects=projects)
        pseudonyms = PseudonymMap(sessions, keys)

        def archive_reader() -> DicomwebArchiveReader:
            return DicomwebArchiveReader(s.archive_url, s.archive_dicomweb_path, username=s.archive_username,
                                         password=s.archive_password.get_secret_value(),
                                         timeout=s.archive_timeout_seconds)

        job = ExportJob(service, pseudonyms, self.recorder, archive_reader,
                        bundles_dir=s.exports_dir or s.stack_dir / "exports", archive_id=s.archive_dicomweb_url,
                        destinations=destinations, stow_batch_instances=s.exports_stow_batch_instances,
                        stow_batch_max_bytes=s.exports_stow_batch_max_bytes)
        reidentification = ReidentificationService(sessions, self.recorder, pseudonyms, gateway_id=s.audit_source_id)
        return ExportComponents(service, reidentification, job, keys)

    # -- the gateway's routes ----------------------------------------------------------------------

    def services(self) -> Services:
        return Services(settings=self.settings, verifier=self.verifier, auditor=self.recorder,
                        dicomweb=self.dicomweb, policy=self.policy, audit_read=self.audit_read,
                        exports=self.exports,
                        archive_keys=self.key_operations if self.archive_encrypted else None,
                        shred_requests=self.shred_requests if self.archive_encrypted else None)

    # -- release -----------------------------------------------------------------------------------

    def _built(self, name: str) -> bool:
        return name in self.__dict__

    async def aclose(self) -> None:
        """Close the asynchronous clients that were built, then everything else."""
        try:
            if self._built("orthanc"):
                await self.orthanc.aclose()
            if self._built("archive_key_client"):
                await self.archive_key_client.aclose()
            if self._built("http"):
                await self.http.aclose()
        finally:
            self.close()

    def close(self) -> None:
        """Release the synchronous resources that were built (outbox, Elasticsearch, database)."""
        if self._built("outbox"):
            self.outbox.close()
        if self._built("elasticsearch"):
            self.elasticsearch.close()
        if self._built("engine"):
            self.engine.dispose()
