from __future__ import annotations

import pytest

from compliance.config import Settings
from compliance.errors import ConfigurationError


def test_development_defaults_describe_the_local_stack(tmp_path):
    s = Settings(stack_dir=tmp_path)
    assert s.effective_database_url == f"sqlite:///{tmp_path / 'compliance.db'}"
    assert s.effective_jwks_url == "http://127.0.0.1:8180/realms/imaging/protocol/openid-connect/certs"
    assert s.archive_dicomweb_url == "http://127.0.0.1:8042/dicom-web"
    assert s.audit_fail_closed is True


#: A secured Elasticsearch, so that the tests below reach the check they are about.
SECURE_ES = {"elasticsearch_url": "https://es.example:9200",
             "elasticsearch_api_key": "VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw=="}


def test_production_refuses_an_empty_archive_password():
    with pytest.raises(ConfigurationError, match="ARCHIVE_PASSWORD"):
        Settings(environment="production", oidc_issuer="https://idp.example/realms/imaging", **SECURE_ES)


def test_production_refuses_a_plain_http_issuer():
    with pytest.raises(ConfigurationError, match="OIDC_ISSUER"):
        Settings(environment="production", archive_password="x7Vq2LrT9mKp4WzN8sYb3HcD", **SECURE_ES)


def test_production_accepts_a_complete_configuration():
    s = Settings(environment="production", archive_password="x7Vq2LrT9mKp4WzN8sYb3HcD",
                 oidc_issuer="https://idp.example/realms/imaging", **SECURE_ES)
    # what production derives from it: the realm's keys from the issuer, audit failing closed
    assert s.effective_jwks_url == "https://idp.example/realms/imaging/protocol/openid-connect/certs"
    assert s.audit_fail_closed is True


def test_environment_variables_are_read(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPLIANCE_STOW_MAX_BYTES", "1234")
    monkeypatch.setenv("COMPLIANCE_AUDIT_FAIL_CLOSED", "false")
    s = Settings(stack_dir=tmp_path)
    assert s.stow_max_bytes == 1234
    assert s.audit_fail_closed is False


def test_the_realm_url_is_one_string_for_the_cli_login_and_the_import() -> None:
    """Imported Keycloak events' uuids derive from it, and the CLI names it as the authenticator."""
    s = Settings(keycloak_url="http://kc.example:8180/", keycloak_realm="imaging")
    assert s.keycloak_realm_url == "http://kc.example:8180/realms/imaging"
    assert Settings(keycloak_url="http://kc.example:8180", keycloak_realm="imaging").keycloak_realm_url == \
        s.keycloak_realm_url


def test_the_default_environment_is_production(monkeypatch, tmp_path):
    """Nothing configured: production's safeguards hold, and the refusal says why it is production."""
    monkeypatch.delenv("COMPLIANCE_ENVIRONMENT", raising=False)
    assert Settings.model_fields["environment"].default == "production"
    with pytest.raises(ConfigurationError, match="COMPLIANCE_ENVIRONMENT is not set, so production"):
        Settings(stack_dir=tmp_path)


PRODUCTION = {"environment": "production", "oidc_issuer": "https://idp.example/realms/imaging",
              "archive_password": "x7Vq2LrT9mKp4WzN8sYb3HcD", **SECURE_ES}


@pytest.mark.parametrize("name,value", [
    ("archive_password", "changeme"), ("archive_password", "Change-Me!"), ("archive_password", "${ORTHANC_PW}"),
    ("archive_password", "<archive password>"), ("archive_password", "x" * 24), ("archive_password", "s3cret"),
    ("front_secret", "changethis"), ("front_secret", "{{ front_secret }}"), ("oidc_client_secret", "secret"),
    ("oidc_client_secret", "$OIDC_CLIENT_SECRET"), ("archive_patient_index_key", "ab" * 8),
    ("elasticsearch_password", "changeme"), ("archive_pkcs11_pin", "1234"),
])
def test_production_refuses_placeholder_and_short_secrets(name, value):
    settings = {**PRODUCTION, name: value}
    if name == "elasticsearch_password":
        settings |= {"elasticsearch_api_key": "", "elasticsearch_username": "gateway"}
    with pytest.raises(ConfigurationError, match=f"COMPLIANCE_{name.upper()}") as refused:
        Settings(**settings)
    if value != "secret":  # a word the message uses; no other refused value is echoed
        assert value not in refused.value.message


def test_production_accepts_generated_secrets():
    s = Settings(**PRODUCTION, front_secret="9f2c4e7a1b3d5f60718293a4b5c6d7e8f9a0b1c2d3e4f506",
                 oidc_client_secret="Zq3v8LmN2pR7sT1wX4yB6cD9fG0hJ5kA", archive_patient_index_key="c1" * 32,
                 archive_pkcs11_pin="483920")
    assert bytes.fromhex(s.archive_patient_index_key.get_secret_value()) == b"\xc1" * 32


def test_development_allows_the_demo_values():
    """The same values production refuses above are let through in development (the demo stack's)."""
    with pytest.raises(ConfigurationError):
        Settings(**{**PRODUCTION, "front_secret": "changeme"})
    s = Settings(environment="development", archive_password="", front_secret="changeme")
    assert s.front_secret.get_secret_value() == "changeme"
