"""Token verification against the project's own keys: every forged or misdirected token is refused."""

from __future__ import annotations

import base64
import json
import time

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from compliance.auth.tokens import JwksCache, OidcTokenVerifier
from compliance.errors import AuthenticationError, ConfigurationError, UpstreamUnavailable

ISSUER = "http://127.0.0.1:8180/realms/imaging"
AUDIENCE = "compliance-gateway"
NOW = 1_800_000_000.0


def _rsa():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


RSA_KEY = _rsa()
OTHER_REALM_KEY = _rsa()
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def jwk_of(private, kid: str, alg: str) -> dict:
    algo = jwt.algorithms.RSAAlgorithm if alg.startswith(("RS", "PS")) else jwt.algorithms.ECAlgorithm
    jwk = json.loads(algo.to_jwk(private.public_key()))
    jwk.update({"kid": kid, "alg": alg, "use": "sig"})
    return jwk


JWKS = {"keys": [jwk_of(RSA_KEY, "rsa-1", "RS256"), jwk_of(EC_KEY, "ec-1", "ES256"),
                 jwk_of(RSA_KEY, "ps-1", "PS256")]}


def claims(**overrides) -> dict:
    base = {
        "iss": ISSUER,
        "aud": ["compliance-gateway", "account"],
        "sub": "7c1f-alice",
        "exp": int(NOW) + 300,
        "iat": int(NOW) - 5,
        "nbf": int(NOW) - 5,
        "typ": "Bearer",
        "azp": "compliance-cli",
        "preferred_username": "alice",
        "realm_access": {"roles": ["clinician", "default-roles-imaging"]},
        "groups": ["radiology"],
        "jti": "abc",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(payload: dict, key=RSA_KEY, alg: str = "RS256", kid: str | None = "rsa-1") -> str:
    headers = {"kid": kid} if kid else {}
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


class FakeRealm:
    """The realm's JWKS endpoint: serves ``jwks`` (swap it to rotate keys), or fails when ``up`` is False."""

    def __init__(self, jwks: dict) -> None:
        self.jwks = jwks
        self.up = True
        self.fetches: list[str] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.fetches.append(str(request.url))
        if not self.up:
            return httpx.Response(503, text="down")
        return httpx.Response(200, json=self.jwks)


def make_verifier(jwks=JWKS, fetches: list | None = None, clock=lambda: NOW, *, realm: FakeRealm | None = None,
                  jwks_clock=lambda: 0.0, max_age: float = 300.0,
                  allowed_clients=("compliance-cli",)) -> OidcTokenVerifier:
    realm = realm or FakeRealm(jwks)
    if fetches is not None:
        realm.fetches = fetches
    client = httpx.AsyncClient(transport=httpx.MockTransport(realm.handler))
    cache = JwksCache(f"{ISSUER}/protocol/openid-connect/certs", client=client, min_refresh_seconds=10,
                      max_age_seconds=max_age, clock=jwks_clock)
    return OidcTokenVerifier(issuer=ISSUER, audience=AUDIENCE, jwks=cache, leeway_seconds=30, clock=clock,
                             allowed_clients=allowed_clients)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_valid_token_becomes_principal():
    p = await make_verifier().verify(sign(claims()))
    assert p.username == "alice"
    assert p.subject == "7c1f-alice"
    assert "clinician" in p.roles
    assert p.client_id == "compliance-cli"
    assert p.groups == ("radiology",)


@pytest.mark.parametrize("alg,key,kid", [("ES256", EC_KEY, "ec-1"), ("PS256", RSA_KEY, "ps-1")])
async def test_other_allowed_algorithms(alg, key, kid):
    p = await make_verifier().verify(sign(claims(), key=key, alg=alg, kid=kid))
    assert p.username == "alice"


async def test_alg_none_refused():
    token = b64(json.dumps({"alg": "none", "kid": "rsa-1", "typ": "JWT"}).encode()) + "." + b64(
        json.dumps(claims()).encode()) + "."
    with pytest.raises(AuthenticationError, match="algorithm"):
        await make_verifier().verify(token)


async def test_hs256_signed_with_public_key_refused():
    pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = b64(json.dumps({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims()).encode())
    import hashlib
    import hmac

    sig = b64(hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    with pytest.raises(AuthenticationError, match="algorithm"):
        await make_verifier().verify(f"{header}.{payload}.{sig}")


async def test_expired_refused():
    with pytest.raises(AuthenticationError, match="expired"):
        await make_verifier().verify(sign(claims(exp=int(NOW) - 31, iat=int(NOW) - 400)))


async def test_expiry_within_leeway_accepted():
    assert (await make_verifier().verify(sign(claims(exp=int(NOW) - 10)))).username == "alice"


async def test_not_yet_valid_refused():
    with pytest.raises(AuthenticationError, match="not yet valid"):
        await make_verifier().verify(sign(claims(nbf=int(NOW) + 120)))


async def test_wrong_issuer_refused():
    with pytest.raises(AuthenticationError, match="issuer"):
        await make_verifier().verify(sign(claims(iss="http://127.0.0.1:8180/realms/other")))


async def test_wrong_audience_refused():
    with pytest.raises(AuthenticationError, match="not meant"):
        await make_verifier().verify(sign(claims(aud="account")))


async def test_missing_audience_refused():
    with pytest.raises(AuthenticationError):
        await make_verifier().verify(sign(claims(aud=None)))


async def test_unknown_kid_refetches_once_then_refuses():
    fetches: list = []
    v = make_verifier(fetches=fetches)
    with pytest.raises(AuthenticationError, match="unknown key"):
        await v.verify(sign(claims(), kid="rotated-away"))
    with pytest.raises(AuthenticationError, match="unknown key"):
        await v.verify(sign(claims(), kid="another-unknown"))
    # the second unknown kid within the refresh interval does not trigger another fetch
    assert len(fetches) == 1


async def test_key_rotation_picked_up_on_unknown_kid():
    new_key = _rsa()
    rotated = {"keys": [*JWKS["keys"], jwk_of(new_key, "rsa-2", "RS256")]}
    v = make_verifier(jwks=rotated)
    assert (await v.verify(sign(claims(), key=new_key, kid="rsa-2"))).username == "alice"


async def test_tampered_payload_refused():
    token = sign(claims())
    header, payload, sig = token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["realm_access"]["roles"] = ["admin"]
    with pytest.raises(AuthenticationError, match="signature"):
        await make_verifier().verify(f"{header}.{b64(json.dumps(forged).encode())}.{sig}")


async def test_token_from_another_realm_refused():
    other = sign(claims(iss="http://127.0.0.1:8180/realms/other"), key=OTHER_REALM_KEY, kid="rsa-1")
    with pytest.raises(AuthenticationError):
        await make_verifier().verify(other)


async def test_token_signed_by_foreign_key_with_known_kid_refused():
    with pytest.raises(AuthenticationError, match="signature"):
        await make_verifier().verify(sign(claims(), key=OTHER_REALM_KEY, kid="rsa-1"))


async def test_algorithm_not_matching_the_keys_declared_alg_refused():
    with pytest.raises(AuthenticationError, match="does not match"):
        await make_verifier().verify(sign(claims(), key=RSA_KEY, alg="PS256", kid="rsa-1"))


async def test_id_token_refused():
    with pytest.raises(AuthenticationError, match="access tokens"):
        await make_verifier().verify(sign(claims(typ="ID")))


async def test_missing_kid_refused():
    with pytest.raises(AuthenticationError, match="no signing key"):
        await make_verifier().verify(sign(claims(), kid=None))


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "Bearer x"])
async def test_garbage_refused(garbage):
    with pytest.raises(AuthenticationError):
        await make_verifier().verify(garbage)


def test_symmetric_algorithms_cannot_be_configured():
    with pytest.raises(ValueError):
        OidcTokenVerifier(issuer=ISSUER, audience=AUDIENCE, jwks=JwksCache("http://x"), algorithms=["HS256"],
                          allowed_clients=["compliance-cli"])


async def test_wall_clock_by_default():
    cache = JwksCache("http://unused")
    cache.load(JWKS)
    v = OidcTokenVerifier(issuer=ISSUER, audience=AUDIENCE, jwks=cache, allowed_clients=["compliance-cli"])
    now = int(time.time())
    with pytest.raises(AuthenticationError, match="expired"):
        await v.verify(sign(claims(exp=now - 100, iat=now - 400, nbf=now - 400)))
    assert (await v.verify(sign(claims(exp=now + 100, iat=now, nbf=now)))).username == "alice"


async def test_non_numeric_exp_refused():
    with pytest.raises(AuthenticationError):
        await make_verifier().verify(sign(claims(exp="tomorrow")))


async def test_cached_token_still_expires():
    now = [NOW]
    v = make_verifier(clock=lambda: now[0])
    token = sign(claims(exp=int(NOW) + 60))
    assert (await v.verify(token)).username == "alice"
    now[0] = NOW + 30
    assert (await v.verify(token)).username == "alice"  # served from the cache
    now[0] = NOW + 60 + 31
    with pytest.raises(AuthenticationError, match="expired"):
        await v.verify(token)


async def test_a_refused_token_is_never_cached():
    v = make_verifier()
    forged = sign(claims(), key=OTHER_REALM_KEY, kid="rsa-1")
    for _ in range(2):
        with pytest.raises(AuthenticationError):
            await v.verify(forged)


# --- azp: only the clients people log in through (issue 12 item 11) ---------------------------------

def service_account_claims(client: str = "compliance-gateway") -> dict:
    """What Keycloak puts in a client-credentials token: the audience, a service-account user, no person."""
    return claims(azp=client, preferred_username=f"service-account-{client}", sub="5e7-service-account",
                  realm_access={"roles": ["default-roles-imaging"]}, groups=None, client_id=client)


async def test_client_credentials_token_of_the_gateways_own_client_refused():
    with pytest.raises(AuthenticationError, match="client 'compliance-gateway' are not accepted"):
        await make_verifier().verify(sign(service_account_claims()))


async def test_token_without_azp_refused():
    with pytest.raises(AuthenticationError, match="names no client"):
        await make_verifier().verify(sign(claims(azp=None)))


@pytest.mark.parametrize("azp", ["", "COMPLIANCE-CLI", "compliance-cli ", 7, ["compliance-cli"]])
async def test_azp_must_equal_an_allowed_client_exactly(azp):
    with pytest.raises(AuthenticationError):
        await make_verifier().verify(sign(claims(azp=azp)))


async def test_a_service_client_listed_explicitly_is_accepted():
    v = make_verifier(allowed_clients=["compliance-cli", "ai-service"])
    assert (await v.verify(sign(service_account_claims("ai-service")))).client_id == "ai-service"
    with pytest.raises(AuthenticationError, match="not accepted"):
        await v.verify(sign(service_account_claims("compliance-gateway")))


@pytest.mark.parametrize("allowed", [[], [""], ["  "]])
def test_an_empty_client_list_cannot_be_configured(allowed):
    with pytest.raises(ConfigurationError, match="ALLOWED_CLIENTS"):
        make_verifier(allowed_clients=allowed)


# --- a key that left the realm's JWKS stops verifying, cached verifications included ---------------

ROTATED = {"keys": [jwk_of(EC_KEY, "ec-1", "ES256")]}  # rsa-1 removed


async def test_cached_verification_dropped_when_its_key_leaves_the_jwks():
    realm, t = FakeRealm(JWKS), [0.0]
    v = make_verifier(realm=realm, jwks_clock=lambda: t[0], max_age=300)
    token = sign(claims())
    assert (await v.verify(token)).username == "alice"
    realm.jwks = ROTATED  # the realm rotates rsa-1 out
    t[0] = 299.0
    assert (await v.verify(token)).username == "alice"  # not re-checked yet: within the max age
    t[0] = 300.0
    with pytest.raises(AuthenticationError, match="unknown key"):
        await v.verify(token)
    assert len(realm.fetches) == 2
    # a token signed by a key still published keeps working, from a single re-check
    assert (await v.verify(sign(claims(), key=EC_KEY, alg="ES256", kid="ec-1"))).username == "alice"
    assert len(realm.fetches) == 2


async def test_cached_verification_dropped_when_its_kid_names_other_key_material():
    realm, t = FakeRealm(JWKS), [0.0]
    v = make_verifier(realm=realm, jwks_clock=lambda: t[0])
    token = sign(claims())
    assert (await v.verify(token)).username == "alice"
    realm.jwks = {"keys": [jwk_of(OTHER_REALM_KEY, "rsa-1", "RS256")]}  # same kid, another key
    t[0] = 400.0
    with pytest.raises(AuthenticationError, match="signature"):
        await v.verify(token)


async def test_a_reload_that_removes_a_key_forgets_its_verifications_at_once():
    realm, t = FakeRealm(JWKS), [0.0]
    v = make_verifier(realm=realm, jwks_clock=lambda: t[0])
    rsa_token, ec_token = sign(claims()), sign(claims(), key=EC_KEY, alg="ES256", kid="ec-1")
    await v.verify(rsa_token)
    await v.verify(ec_token)
    assert len(v._verified) == 2
    realm.jwks = ROTATED
    t[0] = 300.0
    await v.verify(ec_token)  # the re-check happens on this use
    assert [hit.kid for hit in v._verified.values()] == ["ec-1"]


async def test_unchanged_jwks_keeps_the_cache():
    realm, t = FakeRealm(JWKS), [0.0]
    v = make_verifier(realm=realm, jwks_clock=lambda: t[0])
    token = sign(claims())
    await v.verify(token)
    for step in range(1, 5):
        t[0] = step * 300.0
        assert (await v.verify(token)).username == "alice"
    assert len(realm.fetches) == 5
    assert len(v._verified) == 1


async def test_jwks_unreachable_keeps_the_last_copy_for_one_more_max_age_then_refuses():
    realm, t = FakeRealm(JWKS), [0.0]
    v = make_verifier(realm=realm, jwks_clock=lambda: t[0], max_age=300)
    token = sign(claims())
    await v.verify(token)
    realm.up = False
    t[0] = 320.0
    assert (await v.verify(token)).username == "alice"  # Keycloak restarting: the last copy serves
    t[0] = 325.0
    assert (await v.verify(sign(claims(jti="other")))).username == "alice"  # throttled, no new fetch
    assert len(realm.fetches) == 2
    t[0] = 600.0
    with pytest.raises(UpstreamUnavailable):
        await v.verify(token)
    t[0] = 605.0  # within the refresh throttle: still refused, without asking again
    with pytest.raises(UpstreamUnavailable):
        await v.verify(token)
    assert len(realm.fetches) == 3
    realm.up = True
    t[0] = 611.0
    assert (await v.verify(token)).username == "alice"


def test_max_age_must_be_bounded():
    with pytest.raises(ValueError):
        JwksCache("http://x", max_age_seconds=0)
