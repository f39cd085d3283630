"""Settings: the one place configuration is read (environment prefix ``COMPLIANCE_``).

Values come, in order of precedence, from the process environment, then from the stack's
``gateway.env`` (written by ``deploy/local/up`` with the generated demo credentials), then from the
defaults below, which describe the local stack on loopback.

Outside ``environment=development`` the settings refuse to start with a missing archive password or
with an OIDC issuer that is not HTTPS, or an Elasticsearch that is not HTTPS or takes no credentials,
so a demo configuration cannot reach production unnoticed.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from compliance.errors import ConfigurationError

#: The checkout's root: policies/, audit/ and deploy/ are found relative to it.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def default_stack_dir() -> Path:
    return Path(os.environ.get("COMPLIANCE_STACK_DIR") or PROJECT_ROOT / ".stack")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COMPLIANCE_", extra="ignore")

    environment: Literal["development", "production"] = "development"
    stack_dir: Path = Field(default_factory=default_stack_dir)

    # --- the gateway's own HTTP listener (compliance serve)
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    #: Where clients connect (the nginx front of ``compliance front``); empty means ``host:port``.
    #: Archive answers that name URLs (WADO-RS metadata) point here.
    public_address: str = ""
    #: Answer WADO-RS retrieves that came through the nginx front with X-Accel-Redirect once decided
    #: and audited, so nginx streams the bytes (compliance/dicomweb/front.py). Off: the gateway relays them.
    retrieve_delegation: bool = False
    #: Shared by the gateway and its nginx front: nginx sends it in X-Compliance-Front, and the gateway
    #: releases a retrieve only to a request carrying it. Empty: nothing is released. The stack
    #: generates it into gateway.env.
    front_secret: SecretStr = SecretStr("")
    #: Site identity written into every audit event (AuditSourceIdentification).
    audit_source_id: str = "compliance-gateway"
    audit_enterprise_site_id: str = "demo-hospital"

    # --- SQL database: audit outbox, export requests, key metadata
    #: SQLAlchemy URL; empty means SQLite under the stack directory.
    database_url: str = ""

    # --- the archive behind the gateway (Orthanc with its DICOMweb plugin)
    archive_url: str = "http://127.0.0.1:8042"
    archive_dicomweb_path: str = "/dicom-web"
    archive_username: str = "gateway"
    archive_password: SecretStr = SecretStr("")
    archive_timeout_seconds: float = 60.0
    #: Connections kept open to the archive per gateway process.
    archive_max_connections: int = 64

    # --- OIDC (Keycloak)
    oidc_issuer: str = "http://127.0.0.1:8180/realms/imaging"
    #: Empty means ``{issuer}/protocol/openid-connect/certs``.
    oidc_jwks_url: str = ""
    oidc_audience: str = "compliance-gateway"
    oidc_algorithms: list[str] = ["RS256", "ES256", "PS256"]
    oidc_leeway_seconds: int = 30
    #: Minimum time between two JWKS fetches triggered by unknown key ids (throttles kid-spraying).
    oidc_jwks_min_refresh_seconds: float = 10.0
    #: The JWKS is re-checked when older than this, so a key removed from the realm stops verifying
    #: tokens (cached ones too) within it; if Keycloak is unreachable the last copy serves at most as long again.
    oidc_jwks_max_age_seconds: float = 300.0
    #: Clients (``azp``) whose tokens are accepted: those people log in through. A client-credentials
    #: token of any other client (the gateway's own service account) is refused; list a service client
    #: here only if an application must call the gateway with it. A JSON list in the environment.
    oidc_allowed_clients: list[str] = ["compliance-cli"]
    keycloak_url: str = "http://127.0.0.1:8180"
    keycloak_realm: str = "imaging"
    keycloak_cli_client_id: str = "compliance-cli"
    #: The gateway's own confidential client (its service account may only view the realm's users:
    #: realm-management view-users/query-users), for the detections that read accounts (disabled
    #: accounts, family names). Never Keycloak's master admin. The stack writes the secret.
    oidc_client_id: str = "compliance-gateway"
    oidc_client_secret: SecretStr = SecretStr("")

    # --- policy
    rbac_policy_file: Path = PROJECT_ROOT / "policies" / "rbac.yaml"

    # --- DICOMweb limits
    stow_max_bytes: int = 256 * 1024 * 1024
    qido_max_response_bytes: int = 64 * 1024 * 1024

    # --- audit
    elasticsearch_url: str = "http://127.0.0.1:9200"
    #: TLS and credentials of the audit repository; compliance/audit/es_client.py builds every client
    #: from them. The CA bundle (PEM) that signs the cluster's certificate, for an https:// URL; empty:
    #: the system's trust store. Certificate verification cannot be switched off.
    elasticsearch_ca_file: Path | None = None
    #: An API key as Elasticsearch returns it ("encoded": base64 of id:key), sent as ``ApiKey``; or basic
    #: credentials (a username and its password). Not both. Over http:// only in development.
    elasticsearch_api_key: SecretStr = SecretStr("")
    elasticsearch_username: str = ""
    elasticsearch_password: SecretStr = SecretStr("")
    #: Client certificate (PEM) for mutual TLS, and its key when not in the same file; optional.
    elasticsearch_client_cert_file: Path | None = None
    elasticsearch_client_key_file: Path | None = None
    audit_index_prefix: str = "compliance-audit"
    #: Refuse the request when its audit event cannot be recorded (DESIGN.md: fail closed).
    audit_fail_closed: bool = True
    audit_ship_interval_seconds: float = 0.5
    audit_ship_batch_size: int = 1000
    #: Longest wait between two attempts while the audit repository is unreachable.
    audit_ship_max_backoff_seconds: float = 10.0
    #: Start the background shipper inside the gateway process.
    audit_shipper_enabled: bool = True
    #: Where events go, comma-separated: elasticsearch, syslog (compliance/audit/fanout.py).
    audit_sinks: str = "elasticsearch"
    #: The external audit record repository (syslog over TLS, RFC 5425; IHE ATNA ITI-20).
    audit_syslog_host: str = "127.0.0.1"
    audit_syslog_port: int = 6514
    audit_syslog_ca_file: Path | None = None
    #: Client certificate and key for mutual TLS (ATNA node authentication), optional.
    audit_syslog_cert_file: Path | None = None
    audit_syslog_key_file: Path | None = None
    #: The name the receiver's certificate must carry; empty means the host.
    audit_syslog_server_name: str = ""
    #: Signed checkpoints over the hash chain (compliance/audit/checkpoints.py). Empty key file means
    #: ``{stack_dir}/audit-checkpoint-ed25519.pem``.
    audit_checkpoint_key_file: Path | None = None
    audit_checkpoint_every_events: int = 1000
    audit_checkpoint_every_seconds: float = 60.0
    #: Retention and legal holds for ``compliance audit prune``; a hold naming a patient also refuses
    #: that patient's crypto-shred (compliance/archive/shred.py).
    retention_policy_file: Path = PROJECT_ROOT / "policies" / "retention.yaml"
    #: Detections over the audit trail (compliance audit detect) and the name on patient-facing reports.
    audit_detections_file: Path = PROJECT_ROOT / "policies" / "detections.yaml"
    organization_name: str = "Demo Hospital"

    # --- research exports (compliance/exports/)
    #: Encrypted bundles; empty means ``{stack_dir}/exports``.
    exports_dir: Path | None = None
    #: Local keyring holding the KEK that wraps per-project export keys; empty means
    #: ``{stack_dir}/keys/exports-keyring.json`` (development only: created on first use).
    exports_keyring_file: Path | None = None
    #: inprocess (the SQL database as the queue), dramatiq (Redis), none (dedicated workers elsewhere).
    exports_worker_backend: Literal["inprocess", "dramatiq", "none"] = "inprocess"
    exports_poll_interval_seconds: float = 1.0
    exports_bundle_ttl_hours: float = 168.0
    exports_redis_url: str = "redis://127.0.0.1:6379/0"
    #: The allow-list of research archives an export may be pushed to (STOW-RS); a request names one,
    #: never a URL. A missing file means bundles only. Secrets are named there, read from the environment.
    exports_destinations_file: Path = PROJECT_ROOT / "policies" / "export-destinations.yaml"
    #: Instances (and at most this many bytes) per STOW-RS request when pushing to a destination.
    exports_stow_batch_instances: int = 16
    exports_stow_batch_max_bytes: int = 64 * 1024 * 1024
    #: Job recovery (compliance/exports/recovery.py): a running job's lease (renewed every quarter of
    #: it), attempts before a job whose worker keeps dying fails, the recovery sweep's interval, and
    #: when an approval the queue never took (or never claimed) is dispatched again.
    exports_lease_seconds: float = 120.0
    exports_max_attempts: int = 3
    exports_sweep_interval_seconds: float = 15.0
    exports_dispatch_grace_seconds: float = 10.0
    exports_redispatch_after_seconds: float = 600.0

    # --- encryption at rest of the archive (compliance/archive/: Orthanc's storage plugin)
    #: The archive stores every file encrypted (the plugin is loaded); the gateway then checks a
    #: The registry of research projects and their members (compliance/exports/projects.py): a researcher
    #: requests exports only for a project listed there that they belong to. Must exist (validated at start).
    exports_projects_file: Path = PROJECT_ROOT / "policies" / "projects.yaml"
    #: study's erasure state before WADO and maps archive read failures to 410 / integrity errors.
    archive_encrypted: bool = False
    #: Where the archive's KEKs live: ``local`` (keyring file) or ``pkcs11`` (an HSM / SoftHSM2).
    archive_key_provider: Literal["local", "pkcs11"] = "local"
    #: Empty means ``{stack_dir}/archive-keys/keyring.json`` (never inside Orthanc's storage).
    archive_keyring_file: Path | None = None
    #: Key metadata (wrapped data keys); empty means SQLite ``{stack_dir}/archive-keys/keys.db``.
    archive_keys_database_url: str = ""
    #: Hex secret keying the HMAC of patient ids in the key table (generated by deploy/local/up).
    archive_patient_index_key: SecretStr = SecretStr("")
    archive_pkcs11_module: str = ""
    archive_pkcs11_token_label: str = "compliance-archive"  # noqa: S105 - a token label, not a secret
    archive_pkcs11_pin: SecretStr = SecretStr("")

    @field_validator("elasticsearch_ca_file", "elasticsearch_client_cert_file", "elasticsearch_client_key_file",
                     mode="before")
    @classmethod
    def _empty_path_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _check_elasticsearch(self) -> Settings:
        """The audit repository's connection (issue 12 item 8): TLS settings and credentials that agree
        with each other and with the URL; outside development, https:// and credentials, so the trail
        (patient identifiers) and the credentials never travel in clear."""
        url, name = urlsplit(self.elasticsearch_url), "COMPLIANCE_ELASTICSEARCH"
        api_key = self.elasticsearch_api_key.get_secret_value()
        basic = bool(self.elasticsearch_username or self.elasticsearch_password.get_secret_value())
        if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
            raise ConfigurationError(f"{name}_URL must be http(s)://HOST[:PORT][/PATH], not {self.elasticsearch_url!r}")
        if url.username is not None or url.password is not None:
            raise ConfigurationError(f"{name}_URL must not carry credentials (the URL is logged and named in audit "
                                     f"events): set {name}_API_KEY, or {name}_USERNAME and {name}_PASSWORD")
        if api_key and basic:
            raise ConfigurationError(f"{name}_API_KEY and {name}_USERNAME/_PASSWORD are both set: choose one")
        if basic and not (self.elasticsearch_username and self.elasticsearch_password.get_secret_value()):
            raise ConfigurationError(f"{name}_USERNAME and {name}_PASSWORD go together")
        if api_key and (api_key != api_key.strip() or not api_key.isprintable()):
            raise ConfigurationError(f"{name}_API_KEY holds whitespace or control characters")
        if self.elasticsearch_client_key_file and not self.elasticsearch_client_cert_file:
            raise ConfigurationError(f"{name}_CLIENT_KEY_FILE is set without {name}_CLIENT_CERT_FILE")
        if url.scheme == "http" and (self.elasticsearch_ca_file or self.elasticsearch_client_cert_file):
            raise ConfigurationError(f"{name}_CA_FILE or _CLIENT_CERT_FILE is set but {name}_URL is http://: "
                                     "nothing would be encrypted; use https://")
        if self.environment != "development":
            if url.scheme != "https":
                raise ConfigurationError(f"{name}_URL must be https:// outside development: the audit trail "
                                         "(patient identifiers) and any credentials would travel in clear")
            if not (api_key or basic or self.elasticsearch_client_cert_file):
                raise ConfigurationError(f"Elasticsearch needs credentials outside development: {name}_API_KEY, "
                                         f"or {name}_USERNAME and {name}_PASSWORD, or {name}_CLIENT_CERT_FILE")
        return self

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.environment != "development":
            if not self.archive_password.get_secret_value():
                raise ConfigurationError("COMPLIANCE_ARCHIVE_PASSWORD must be set outside development")
            if not self.oidc_issuer.startswith("https://"):
                raise ConfigurationError("COMPLIANCE_OIDC_ISSUER must be https:// outside development")
        return self

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.stack_dir / 'compliance.db'}"

    @property
    def effective_checkpoint_key_file(self) -> Path:
        return self.audit_checkpoint_key_file or self.stack_dir / "audit-checkpoint-ed25519.pem"

    @property
    def archive_keys_dir(self) -> Path:
        return self.stack_dir / "archive-keys"

    @property
    def effective_archive_keyring_file(self) -> Path:
        return self.archive_keyring_file or self.archive_keys_dir / "keyring.json"

    @property
    def effective_archive_keys_database_url(self) -> str:
        return self.archive_keys_database_url or f"sqlite:///{self.archive_keys_dir / 'keys.db'}"

    @property
    def effective_public_address(self) -> str:
        return self.public_address or f"{self.host}:{self.port}"

    @property
    def keycloak_realm_url(self) -> str:
        """The realm's URL at Keycloak's admin-facing address: the authenticator named in 110114 events
        (the CLI's own and those imported from Keycloak, whose uuids derive from it)."""
        return f"{self.keycloak_url.rstrip('/')}/realms/{self.keycloak_realm}"

    @property
    def effective_jwks_url(self) -> str:
        return self.oidc_jwks_url or f"{self.oidc_issuer.rstrip('/')}/protocol/openid-connect/certs"

    @property
    def archive_dicomweb_url(self) -> str:
        return self.archive_url.rstrip("/") + self.archive_dicomweb_path


def load_settings(**overrides: object) -> Settings:
    """Build settings, reading the stack's generated ``gateway.env`` when it exists."""
    stack_dir = Path(str(overrides.get("stack_dir") or default_stack_dir()))
    env_file = stack_dir / "gateway.env"
    if env_file.is_file():
        return Settings(_env_file=env_file, **overrides)  # type: ignore[arg-type,call-arg]
    return Settings(**overrides)  # type: ignore[arg-type]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
