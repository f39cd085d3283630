"""The one place an Elasticsearch client is built: TLS and credentials from the settings.

Everything that talks to the audit repository gets its client here: the sink and the checkpoints it
publishes, the privacy officer's queries and reports, the detections, and ``compliance audit
verify|prune|search|report|detect``. What the settings ask for (``COMPLIANCE_ELASTICSEARCH_*``,
validated in :class:`compliance.config.Settings`) therefore holds for every connection:

* an ``https://`` URL: the cluster's certificate and host name are verified, against
  ``COMPLIANCE_ELASTICSEARCH_CA_FILE`` alone when set, else the system's trust store; TLS 1.2 at
  least. Nothing here switches verification off.
* credentials: an API key (``Authorization: ApiKey``), basic credentials, or a client certificate
  (mutual TLS), or an API key/basic credentials together with a client certificate.
* the settings refuse credentials over ``http://`` outside development; in development they are
  allowed with a warning (a loopback lab).

The gateway builds one client at start-up and shares its connection pool between the sink and the
read services (:meth:`~elasticsearch.Elasticsearch.options` for a longer timeout); a CLI command
builds one per run. :func:`connect` without credentials is for tools and tests that read a lab's
plain endpoint.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elasticsearch import Elasticsearch
from elasticsearch.serializer import NdjsonSerializer

from compliance.errors import ConfigurationError

if TYPE_CHECKING:
    from compliance.config import Settings

__all__ = ["connect", "elasticsearch_client", "tls_context"]

log = logging.getLogger(__name__)


class PrebuiltNdjson(NdjsonSerializer):
    """NDJSON serializer that passes a body already built as bytes through (the stock one copies it
    twice: the audit sink builds its bulk bodies itself); anything else (lists of actions from
    ``elasticsearch.helpers``) is serialised as usual."""

    def dumps(self, data: Any) -> bytes:
        if isinstance(data, bytes) and data.endswith(b"\n"):
            return data
        return super().dumps(data)


def tls_context(ca_file: Path | None = None, cert_file: Path | None = None,
                key_file: Path | None = None) -> ssl.SSLContext:
    """A client TLS context that verifies the server: certificate chain and host name, TLS >= 1.2.

    ``ca_file`` replaces the system's trust store (only that CA is trusted); ``cert_file`` (and
    ``key_file`` when the key is not in it) is the client certificate for mutual TLS.
    """
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot read the Elasticsearch CA file {ca_file}: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        try:
            context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"cannot load the Elasticsearch client certificate {cert_file}: {exc}") from exc
    return context


def connect(url: str, *, ca_file: Path | None = None, api_key: str = "", username: str = "",
            password: str = "", client_cert_file: Path | None = None, client_key_file: Path | None = None,
            request_timeout: float = 10.0, max_retries: int = 1) -> Elasticsearch:
    """A client for ``url`` with the given TLS material and credentials (at most one of an API key and
    basic credentials). Timeouts are not retried: a slow cluster is reported, not hammered."""
    options: dict[str, Any] = {
        "request_timeout": request_timeout, "max_retries": max_retries, "retry_on_timeout": False,
        "serializers": {"application/x-ndjson": PrebuiltNdjson()},
    }
    secure = url.lower().startswith("https://")
    if secure:
        options["ssl_context"] = tls_context(ca_file, client_cert_file, client_key_file)
    elif ca_file or client_cert_file:
        raise ConfigurationError(f"TLS files given for {url}, which is not https://")
    if api_key and (username or password):
        raise ConfigurationError("an Elasticsearch API key and basic credentials are both given: choose one")
    if api_key:
        options["api_key"] = api_key
    elif username or password:
        options["basic_auth"] = (username, password)
    if not secure and (api_key or username):
        log.warning("INSECURE: Elasticsearch credentials are sent in clear to %s (development only)", url)
    return Elasticsearch(url, **options)


def elasticsearch_client(settings: Settings, *, request_timeout: float = 10.0, max_retries: int = 1) -> Elasticsearch:
    """The client the settings describe (``COMPLIANCE_ELASTICSEARCH_*``)."""
    return connect(
        settings.elasticsearch_url,
        ca_file=settings.elasticsearch_ca_file,
        api_key=settings.elasticsearch_api_key.get_secret_value(),
        username=settings.elasticsearch_username,
        password=settings.elasticsearch_password.get_secret_value(),
        client_cert_file=settings.elasticsearch_client_cert_file,
        client_key_file=settings.elasticsearch_client_key_file,
        request_timeout=request_timeout,
        max_retries=max_retries,
    )
