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


def test_production_refuses_an_empty_archive_password():
    with pytest.raises(ConfigurationError, match="ARCHIVE_PASSWORD"):
        Settings(environment="production", oidc_issuer="https://idp.example/realms/imaging")


def test_production_refuses_a_plain_http_issuer():
    with pytest.raises(ConfigurationError, match="OIDC_ISSUER"):
        Settings(environment="production", archive_password="s3cret")


def test_production_accepts_a_complete_configuration():
    s = Settings(environment="production", archive_password="s3cret",
                 oidc_issuer="https://idp.example/realms/imaging")
    assert s.environment == "production"


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
