"""The Elasticsearch connection settings (compliance/config.py) and the one client factory
(compliance/audit/es_client.py): what is refused, and what each setting turns into on the client."""

from __future__ import annotations

import base64
import secrets
import ssl
import subprocess
from pathlib import Path

import pytest

from compliance.audit.elasticsearch import ElasticsearchAuditSink
from compliance.audit.es_client import connect, elasticsearch_client, tls_context
from compliance.config import Settings
from compliance.errors import ConfigurationError
from compliance.wiring import Role, Wiring

ES = "COMPLIANCE_ELASTICSEARCH"


@pytest.fixture(autouse=True)
def _no_es_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read the environment: only what each test passes counts."""
    import os

    for name in list(os.environ):
        if name.startswith(("COMPLIANCE_ELASTICSEARCH_", "COMPLIANCE_ENVIRONMENT")):
            monkeypatch.delenv(name)


def dev(**values: object) -> Settings:
    return Settings(environment="development", **values)  # type: ignore[arg-type]


def prod(**values: object) -> Settings:
    return Settings(environment="production", archive_password=secrets.token_hex(16),  # type: ignore[arg-type]
                    oidc_issuer="https://keycloak.example/realms/imaging", **values)


#: Credentials that look like generated ones (production refuses placeholders such as "p").
KEY = base64.b64encode(b"gateway:" + secrets.token_hex(16).encode()).decode()
PW = secrets.token_hex(16)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA and a client certificate signed by it (PEM), made with openssl."""
    d = tmp_path_factory.mktemp("pki")
    run = lambda *a: subprocess.run(a, cwd=d, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test CA")
    run("openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=client")
    run("openssl", "x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", "7",
        "-days", "2", "-out", "client.pem")
    return {n: d / f"{n}.pem" for n in ("ca", "client")} | {"client_key": d / "client.key"}


# ------------------------------------------------------------------ settings: refused in every environment


@pytest.mark.parametrize("url", ["127.0.0.1:9200", "ftp://es:9200", "https://", "https://es:9200/?x=1",
                                 "https://es:9200/#f"])
def test_a_url_that_is_not_http_or_https_to_a_host_is_refused(url):
    with pytest.raises(ConfigurationError, match=f"{ES}_URL must be http"):
        dev(elasticsearch_url=url)


@pytest.mark.parametrize("url", ["https://elastic:secret@es:9200", "https://elastic@es:9200"])
def test_credentials_in_the_url_are_refused_and_not_repeated(url):
    with pytest.raises(ConfigurationError, match="must not carry credentials") as caught:
        dev(elasticsearch_url=url)
    assert "secret" not in str(caught.value)


def test_an_api_key_and_basic_credentials_together_are_refused():
    with pytest.raises(ConfigurationError, match="choose one"):
        dev(elasticsearch_url="https://es:9200", elasticsearch_api_key="a2V5",
            elasticsearch_username="u", elasticsearch_password="p")


@pytest.mark.parametrize("given", [{"elasticsearch_username": "u"}, {"elasticsearch_password": "p"}])
def test_a_username_without_password_or_the_reverse_is_refused(given):
    with pytest.raises(ConfigurationError, match="go together"):
        dev(elasticsearch_url="https://es:9200", **given)


@pytest.mark.parametrize("key", ["a2V5\n", " a2V5", "a2V5\r\nX-Injected: 1"])
def test_an_api_key_with_whitespace_or_control_characters_is_refused(key):
    with pytest.raises(ConfigurationError, match="whitespace or control") as caught:
        dev(elasticsearch_url="https://es:9200", elasticsearch_api_key=key)
    assert "a2V5" not in str(caught.value)


def test_a_client_key_without_its_certificate_is_refused(tmp_path):
    with pytest.raises(ConfigurationError, match="CLIENT_KEY_FILE is set without"):
        dev(elasticsearch_url="https://es:9200", elasticsearch_client_key_file=tmp_path / "k.pem")


@pytest.mark.parametrize("tls", ["elasticsearch_ca_file", "elasticsearch_client_cert_file"])
def test_tls_files_with_an_http_url_are_refused_as_they_would_protect_nothing(tls, tmp_path):
    with pytest.raises(ConfigurationError, match="nothing would be encrypted"):
        dev(elasticsearch_url="http://es:9200", **{tls: tmp_path / "x.pem"})


def test_empty_tls_paths_from_the_environment_mean_unset(monkeypatch):
    monkeypatch.setenv(f"{ES}_CA_FILE", "")
    monkeypatch.setenv(f"{ES}_CLIENT_CERT_FILE", "")
    s = dev(elasticsearch_url="http://es:9200")
    assert s.elasticsearch_ca_file is None and s.elasticsearch_client_cert_file is None


# ------------------------------------------------------------------ settings: development and production


def test_development_takes_a_plain_lab_cluster_and_even_credentials_in_clear():
    assert dev().elasticsearch_url == "http://127.0.0.1:9200"
    assert dev(elasticsearch_url="http://es:9200", elasticsearch_api_key="a2V5").elasticsearch_api_key


@pytest.mark.parametrize("credentials", [{}, {"elasticsearch_api_key": KEY},
                                         {"elasticsearch_username": "u", "elasticsearch_password": PW}])
def test_production_refuses_an_http_url_with_or_without_credentials(credentials):
    with pytest.raises(ConfigurationError, match=f"{ES}_URL must be https:// outside development") as caught:
        prod(elasticsearch_url="http://es:9200", **credentials)
    assert KEY not in str(caught.value) and PW not in str(caught.value)


def test_production_refuses_a_cluster_without_credentials():
    with pytest.raises(ConfigurationError, match="needs credentials outside development"):
        prod(elasticsearch_url="https://es:9200")


@pytest.mark.parametrize("credentials", [{"elasticsearch_api_key": KEY},
                                         {"elasticsearch_username": "u", "elasticsearch_password": PW},
                                         {"elasticsearch_client_cert_file": Path("/etc/client.pem")}])
def test_production_takes_https_with_any_one_kind_of_credentials(credentials):
    s = prod(elasticsearch_url="https://es:9200", **credentials)
    assert s.elasticsearch_url == "https://es:9200"


def test_production_without_a_ca_file_uses_the_system_trust_store():
    s = prod(elasticsearch_url="https://es:9200", elasticsearch_api_key=KEY)
    assert s.elasticsearch_ca_file is None
    client = elasticsearch_client(s)
    try:
        context = _ssl_context(client)
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
        assert context.cert_store_stats()["x509_ca"] == len(ssl.create_default_context().get_ca_certs())
    finally:
        client.close()


# ------------------------------------------------------------------ the client: what the settings turn into


def _node_config(client):  # type: ignore[no-untyped-def]
    return client.transport.node_pool.all()[0].config


def _ssl_context(client) -> ssl.SSLContext:  # type: ignore[no-untyped-def]
    context = _node_config(client).ssl_context
    assert isinstance(context, ssl.SSLContext)
    return context


def _headers(client) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {k.lower(): v for k, v in client._headers.items()}


def test_an_https_client_verifies_the_cluster_against_the_configured_ca_only(pki):
    client = elasticsearch_client(dev(elasticsearch_url="https://es:9200", elasticsearch_ca_file=pki["ca"],
                                      elasticsearch_api_key="a2V5"))
    try:
        context = _ssl_context(client)
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
        assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
        assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "test CA"),),)]
        assert _headers(client)["authorization"] == "ApiKey a2V5"
    finally:
        client.close()


def test_basic_credentials_become_a_basic_authorization_header(pki):
    client = elasticsearch_client(dev(elasticsearch_url="https://es:9200", elasticsearch_ca_file=pki["ca"],
                                      elasticsearch_username="gw", elasticsearch_password="pw"))
    try:
        assert _headers(client)["authorization"] == "Basic " + base64.b64encode(b"gw:pw").decode()
    finally:
        client.close()


def test_a_client_certificate_is_loaded_for_mutual_tls(pki):
    context = tls_context(pki["ca"], pki["client"], pki["client_key"])
    assert context.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ConfigurationError, match="cannot load the Elasticsearch client certificate"):
        tls_context(pki["ca"], pki["client"], pki["ca"])  # a certificate is no key


def test_a_missing_or_unreadable_ca_file_is_a_clear_configuration_error(tmp_path):
    with pytest.raises(ConfigurationError, match="cannot read the Elasticsearch CA file"):
        elasticsearch_client(dev(elasticsearch_url="https://es:9200", elasticsearch_ca_file=tmp_path / "none.pem"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigurationError, match="cannot read the Elasticsearch CA file"):
        elasticsearch_client(dev(elasticsearch_url="https://es:9200", elasticsearch_ca_file=garbage))


def test_a_plain_client_has_no_tls_and_no_credentials():
    client = connect("http://127.0.0.1:9200")
    try:
        assert _node_config(client).scheme == "http"
        assert "authorization" not in _headers(client)
    finally:
        client.close()


def test_credentials_in_clear_are_logged_as_insecure(caplog):
    client = connect("http://127.0.0.1:9200", api_key="a2V5")
    client.close()
    assert any("INSECURE" in r.getMessage() and "a2V5" not in r.getMessage() for r in caplog.records)


def test_the_factory_refuses_what_the_settings_refuse():
    with pytest.raises(ConfigurationError, match="choose one"):
        connect("https://es:9200", api_key="a2V5", username="u", password="p")
    with pytest.raises(ConfigurationError, match="not https"):
        connect("http://es:9200", ca_file=Path("/etc/ssl/certs/ca-certificates.crt"))


def test_the_wired_sink_uses_the_factory_client_and_a_shared_client_is_not_closed_by_it(pki, tmp_path):
    settings = dev(elasticsearch_url="https://es:9200", elasticsearch_ca_file=pki["ca"], elasticsearch_api_key="a2V5",
                   stack_dir=tmp_path)
    wiring = Wiring(settings, Role.GATEWAY)
    sink = wiring.elasticsearch_sink
    assert sink.client is wiring.elasticsearch  # one client for the sink, the checkpoints and the reads
    assert _headers(sink.client)["authorization"] == "ApiKey a2V5"
    assert _ssl_context(sink.client).verify_mode == ssl.CERT_REQUIRED
    wiring.close()

    class Shared:
        closed = 0

        def close(self) -> None:
            self.closed += 1

    shared = Shared()
    sink = ElasticsearchAuditSink(settings.elasticsearch_url, settings.audit_index_prefix,
                                  client=shared)  # type: ignore[arg-type]
    assert sink.client is shared
    sink.close()
    assert shared.closed == 0  # the app that built it closes it, once
