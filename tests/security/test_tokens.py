"""Token attacks against the real gateway and the real Keycloak (issue 12: item 11, and the attacks that
already failed before it, kept so that none regresses).

Each attack gets a 401 with a JSON body, nothing is served, and the refusal is in the audit trail in
Elasticsearch as a 110113 Security Alert (authentication decision) naming the caller as unauthenticated,
with the claim the token made (never trusted) and the reason.

Tokens of another realm, a genuinely expired token and a signing key rotated out of the realm come from a
throwaway realm made for this module through Keycloak's admin API (and deleted afterwards): the shared
``imaging`` realm's keys are never touched, so the tests running beside these are not disturbed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from compliance.config import load_settings
from tests.integration.conftest import _reset_database, drop_prefix

from .conftest import AuditIndex, Gateway, Stack, bearer, start_gateway, stop_gateway

pytestmark = pytest.mark.integration


# --- helpers -----------------------------------------------------------------------------------------

def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def parts(token: str) -> tuple[dict, dict]:
    header, payload, _ = token.split(".")
    return (json.loads(base64.urlsafe_b64decode(header + "==")), json.loads(base64.urlsafe_b64decode(payload + "==")))


def unsigned(header: dict, payload: dict, signature: str = "") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}.{signature}"


def marker(name: str) -> str:
    """A username no other test uses: the refused token's (untrusted) claim that finds its audit event."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def assert_refused(resp: httpx.Response, reason: str) -> dict:
    """401, a JSON error body with the reason and nothing else: no DICOM, no data."""
    assert resp.status_code == 401, (resp.status_code, resp.text[:500])
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert set(body) == {"error", "message"}, body
    assert body["error"] == "unauthenticated"
    assert reason in body["message"], body
    assert 'error="invalid_token"' in resp.headers["www-authenticate"]
    return body


def assert_refusal_audited(audit: AuditIndex, claim: str, reason: str) -> dict:
    """The refusal is in Elasticsearch (110113, authentication decision, unauthenticated) and nothing
    was served to whoever the token claimed to be (no event names it as a verified user)."""
    docs = audit.wait_for(1, **{"event.id": "110113", "user.unverified_claim": claim})
    assert len(docs) == 1, docs
    doc = docs[0]
    assert "110143" in doc["event.type_codes"]  # DCM 110143 Authentication Decision
    assert doc["event.outcome"] == 4
    assert "unauthenticated" in doc["participant.ids"]
    assert doc["user.name"] is None
    assert reason in doc["event.outcome_description"], doc["event.outcome_description"]
    assert audit.search(**{"user.name": claim}) == []
    return doc


def qido(gw: Gateway, token: str) -> httpx.Response:
    return httpx.get(f"{gw.url}/dicom-web/studies", params={"limit": "5"}, headers=bearer(token), timeout=30)


def realm_jwk(stack: Stack, realm: str = "imaging") -> dict:
    keys = httpx.get(f"{stack.keycloak_url}/realms/{realm}/protocol/openid-connect/certs", timeout=30).json()["keys"]
    return next(k for k in keys if k.get("alg") == "RS256" and k.get("use") == "sig")


# --- item 11: a client-credentials token of the gateway's own client ---------------------------------

def test_client_credentials_token_of_the_gateways_own_client_is_refused(stack: Stack, gateway: Gateway, tokens):
    """The gateway's confidential client (its secret is in gateway.env) gets a token with the gateway's
    audience and the realm's signature: before item 11 it was taken as a user called
    service-account-compliance-gateway and answered."""
    secret = stack.settings_env["COMPLIANCE_OIDC_CLIENT_SECRET"]
    r = httpx.post(f"{stack.keycloak_url}/realms/imaging/protocol/openid-connect/token", timeout=30,
                   data={"grant_type": "client_credentials", "client_id": "compliance-gateway",
                         "client_secret": secret})
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    _, claims = parts(token)
    assert claims["azp"] == "compliance-gateway" and "compliance-gateway" in claims["aud"]  # the attack's premise

    assert_refused(qido(gateway, token), "client 'compliance-gateway' are not accepted")
    audit = AuditIndex(stack.es_url, gateway.index_prefix)
    assert_refusal_audited(audit, "service-account-compliance-gateway", "client 'compliance-gateway'")
    # a person's token through the CLI's client is still accepted
    assert qido(gateway, tokens["alice"]).status_code in (200, 204)


# --- attacks that already failed before issue 12 (regression tests) ---------------------------------

def test_token_signed_with_our_own_key_under_the_realms_kid_is_refused(stack: Stack, gateway: Gateway, tokens):
    _, claims = parts(tokens["tom"])
    name = marker("forged")
    claims.update(preferred_username=name, realm_access={"roles": ["admin", "radiologist"]})
    ours = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims, ours, algorithm="RS256", headers={"kid": realm_jwk(stack)["kid"]})
    assert_refused(qido(gateway, forged), "signature does not verify")
    assert_refusal_audited(AuditIndex(stack.es_url, gateway.index_prefix), name, "signature does not verify")


def test_altered_token_with_the_signature_kept_is_refused(stack: Stack, gateway: Gateway, tokens):
    header, payload, signature = tokens["rob"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    name = marker("altered")
    claims.update(preferred_username=name, realm_access={"roles": ["admin", "privacy-officer"]})
    altered = f"{header}.{b64(json.dumps(claims).encode())}.{signature}"
    assert_refused(qido(gateway, altered), "signature does not verify")
    assert_refusal_audited(AuditIndex(stack.es_url, gateway.index_prefix), name, "signature does not verify")


def test_alg_none_is_refused(stack: Stack, gateway: Gateway, tokens):
    header, claims = parts(tokens["alice"])
    name = marker("algnone")
    claims["preferred_username"] = name
    token = unsigned({**header, "alg": "none"}, claims)
    assert_refused(qido(gateway, token), "algorithm 'none' is not accepted")
    assert_refusal_audited(AuditIndex(stack.es_url, gateway.index_prefix), name, "algorithm 'none'")


def test_hs256_signed_with_the_realms_public_key_is_refused(stack: Stack, gateway: Gateway, tokens):
    """Algorithm confusion: the realm's RSA public key (anybody can fetch it) used as an HMAC secret."""
    header, claims = parts(tokens["alice"])
    name = marker("hs256")
    claims["preferred_username"] = name
    public = jwt.algorithms.RSAAlgorithm.from_jwk(json.dumps(realm_jwk(stack)))
    assert isinstance(public, rsa.RSAPublicKey)
    failures = []
    for pem in (public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
                public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)):
        head = b64(json.dumps({**header, "alg": "HS256"}).encode())
        body = b64(json.dumps(claims).encode())
        signature = b64(hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest())
        resp = qido(gateway, f"{head}.{body}.{signature}")
        failures.append(assert_refused(resp, "algorithm 'HS256' is not accepted"))
    audit = AuditIndex(stack.es_url, gateway.index_prefix)
    docs = audit.wait_for(2, **{"event.id": "110113", "user.unverified_claim": name})
    assert len(docs) == 2 and all("algorithm 'HS256'" in d["event.outcome_description"] for d in docs), docs
    assert audit.search(**{"user.name": name}) == []


# --- a throwaway realm: another realm's token, a real expired token, a key rotated out ---------------

class ThrowawayRealm:
    """A realm of this module's own in the shared Keycloak (admin REST API through python-keycloak): a
    public CLI client with the gateway's audience, one with one-second tokens, and one clinician."""

    def __init__(self, stack: Stack) -> None:
        from keycloak import KeycloakAdmin

        secrets = dict(line.split("=", 1) for line in
                       (load_settings().stack_dir / "secrets.env").read_text().splitlines() if "=" in line)
        self.stack = stack
        self.name = f"authverify-{uuid.uuid4().hex[:8]}"
        self.user = marker("visitor")
        self.password = uuid.uuid4().hex
        self.admin = KeycloakAdmin(server_url=stack.keycloak_url + "/", username="admin",
                                   password=secrets["KEYCLOAK_ADMIN_PASSWORD"], realm_name="master")
        audience = {"name": "audience compliance-gateway", "protocol": "openid-connect",
                    "protocolMapper": "oidc-audience-mapper",
                    "config": {"included.client.audience": "compliance-gateway", "access.token.claim": "true",
                               "id.token.claim": "false"}}

        def cli(client_id: str, **attributes: str) -> dict:
            return {"clientId": client_id, "enabled": True, "publicClient": True, "directAccessGrantsEnabled": True,
                    "standardFlowEnabled": False, "attributes": {"access.token.signed.response.alg": "RS256",
                                                                 **attributes},
                    "protocolMappers": [audience]}

        self.admin.create_realm({
            "realm": self.name, "enabled": True, "sslRequired": "none", "accessTokenLifespan": 900,
            "roles": {"realm": [{"name": "clinician"}]},
            "clients": [cli("compliance-cli"), cli("short-lived-cli", **{"access.token.lifespan": "1"})],
            "users": [{"username": self.user, "enabled": True, "emailVerified": True, "firstName": "Visiting",
                       "lastName": "User", "email": f"{self.user}@other.invalid", "realmRoles": ["clinician"],
                       "credentials": [{"type": "password", "value": self.password, "temporary": False}]}],
        })
        self.admin.change_current_realm(self.name)

    @property
    def issuer(self) -> str:
        return f"{self.stack.keycloak_url}/realms/{self.name}"

    def token(self, client_id: str = "compliance-cli") -> str:
        r = httpx.post(f"{self.issuer}/protocol/openid-connect/token", timeout=30,
                       data={"grant_type": "password", "client_id": client_id, "username": self.user,
                             "password": self.password})
        assert r.status_code == 200, r.text
        return str(r.json()["access_token"])

    def rotate_signing_key(self) -> tuple[str, str]:
        """A new RS256 key becomes the active one and the old one is removed from the realm: (old, new) kid."""
        before = {k["kid"] for k in self.jwks() if k.get("alg") == "RS256"}
        realm_id = self.admin.get_realm(self.name)["id"]
        old = [c for c in self.admin.get_components({"parent": realm_id, "type": "org.keycloak.keys.KeyProvider"})
               if c["providerId"] == "rsa-generated"]
        self.admin.create_component({"name": "rsa-rotated", "providerId": "rsa-generated", "parentId": realm_id,
                                     "providerType": "org.keycloak.keys.KeyProvider",
                                     "config": {"priority": ["200"], "algorithm": ["RS256"]}})
        for component in old:
            self.admin.delete_component(component["id"])
        after = {k["kid"] for k in self.jwks() if k.get("alg") == "RS256"}
        assert len(before) == 1 and len(after) == 1 and before != after, (before, after)
        return before.pop(), after.pop()

    def jwks(self) -> list[dict]:
        return list(httpx.get(f"{self.issuer}/protocol/openid-connect/certs", timeout=30).json()["keys"])

    def delete(self) -> None:
        self.admin.change_current_realm("master")
        self.admin.delete_realm(self.name)


@pytest.fixture(scope="module")
def other_realm(stack: Stack) -> Iterator[ThrowawayRealm]:
    realm = ThrowawayRealm(stack)
    try:
        yield realm
    finally:
        realm.delete()


@pytest.fixture(scope="module")
def realm_gateway(stack: Stack, other_realm: ThrowawayRealm,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway of this module's own whose identity provider is the throwaway realm: it re-checks the JWKS
    every 2 s and allows no clock leeway (so a one-second token expires for it)."""
    tmp: Path = tmp_path_factory.mktemp("realm-gateway")
    db = f"sqlite:///{tmp / 'gateway.db'}"
    _reset_database(db)
    prefix = f"test-authverify-{uuid.uuid4().hex[:10]}"
    gw = start_gateway(stack, tmp, database_url=db, index_prefix=prefix, extra_env={
        "COMPLIANCE_OIDC_ISSUER": other_realm.issuer,
        "COMPLIANCE_OIDC_JWKS_MAX_AGE_SECONDS": "2",
        "COMPLIANCE_OIDC_JWKS_MIN_REFRESH_SECONDS": "1",
        "COMPLIANCE_OIDC_LEEWAY_SECONDS": "0",
        "COMPLIANCE_OIDC_ALLOWED_CLIENTS": '["compliance-cli", "short-lived-cli"]',
    })
    try:
        yield gw
    finally:
        stop_gateway(gw)
        drop_prefix(stack, prefix)


def test_token_of_another_realm_is_refused(stack: Stack, gateway: Gateway, other_realm: ThrowawayRealm):
    """A genuine token of another realm of the same Keycloak, with the gateway's audience and a clinician
    role: signed by a key the imaging realm does not publish, issued by another issuer."""
    token = other_realm.token()
    _, claims = parts(token)
    assert claims["iss"] == other_realm.issuer and "compliance-gateway" in claims["aud"]
    assert_refused(qido(gateway, token), "unknown key")
    assert_refusal_audited(AuditIndex(stack.es_url, gateway.index_prefix), other_realm.user, "unknown key")


def test_expired_token_is_refused(stack: Stack, realm_gateway: Gateway, other_realm: ThrowawayRealm):
    """A token the realm really signed, for one second: used after its expiry (no leeway on this gateway)."""
    token = other_realm.token("short-lived-cli")
    _, claims = parts(token)
    assert claims["exp"] - claims["iat"] <= 1
    time.sleep(max(0.0, claims["exp"] + 1.2 - time.time()))  # wait for the token's own end, not for the gateway
    assert_refused(qido(realm_gateway, token), "expired")
    assert_refusal_audited(AuditIndex(stack.es_url, realm_gateway.index_prefix), other_realm.user, "expired")


def test_a_token_whose_key_left_the_realm_stops_working_without_a_restart(stack: Stack, realm_gateway: Gateway,
                                                                          other_realm: ThrowawayRealm):
    """Item 11: the gateway remembers a verified token until its expiry (15 minutes in this realm). When the
    realm rotates its signing key out, that token must stop working once the gateway re-checks the JWKS
    (2 s here), not at its expiry or a restart; a token signed by the new key works."""
    token = other_realm.token()
    assert qido(realm_gateway, token).status_code in (200, 204)  # verified and remembered
    old_kid, new_kid = other_realm.rotate_signing_key()
    assert parts(token)[0]["kid"] == old_kid
    deadline = time.monotonic() + 30
    resp = qido(realm_gateway, token)
    while resp.status_code != 401 and time.monotonic() < deadline:
        time.sleep(0.5)
        resp = qido(realm_gateway, token)
    assert_refused(resp, "unknown key")
    audit = AuditIndex(stack.es_url, realm_gateway.index_prefix)
    docs = audit.wait_for(1, **{"event.id": "110113", "user.unverified_claim": other_realm.user})
    assert any("unknown key" in d["event.outcome_description"] for d in docs), docs
    fresh = other_realm.token()
    assert parts(fresh)[0]["kid"] == new_kid
    assert qido(realm_gateway, fresh).status_code in (200, 204)
