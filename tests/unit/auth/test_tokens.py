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
from compliance.errors import AuthenticationError

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


def make_verifier(jwks=JWKS, fetches: list | None = None, clock=lambda: NOW) -> OidcTokenVerifier:
    served = fetches if fetches is not None else []

    def handler(request: httpx.Request) -> httpx.Response:
        served.append(str(request.url))
        return httpx.Response(200, json=jwks)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    cache = JwksCache(f"{ISSUER}/protocol/openid-connect/certs", client=client, min_refresh_seconds=10,
                      clock=lambda: 0.0)
    return OidcTokenVerifier(issuer=ISSUER, audience=AUDIENCE, jwks=cache, leeway_seconds=30, clock=clock)


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
        OidcTokenVerifier(issuer=ISSUER, audience=AUDIENCE, jwks=JwksCache("http://x"), algorithms=["HS256"])


async def test_wall_clock_by_default():
    cache = JwksCache("http://unused")
    cache.load(JWKS)
    v = OidcTokenVerifier(issuer=ISSUER, audience=AUDIENCE, jwks=cache)
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
