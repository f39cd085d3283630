"""Local verification of OIDC access tokens (RFC 7519, RFC 9068) issued by Keycloak.

Every check happens in-process against the realm's JWKS, which is cached and refreshed when a
token names a key id (``kid``) the cache does not know (key rotation), at most once per
``min_refresh_seconds`` so that a flood of forged ``kid`` values cannot turn the gateway into a
JWKS-fetching amplifier.

Checks, in order; any failure raises :class:`AuthenticationError` with a reason that is safe to
show (it never echoes the token):

1. The header parses and names an allowed asymmetric algorithm (RS256, ES256, PS256 by default).
   ``none`` and every HMAC algorithm are refused before any key is looked at, so a public key can
   never be used as an HMAC secret.
2. The ``kid`` resolves to a key of the realm whose own ``alg``/key type agrees with the header.
3. The signature verifies (PyJWT).
4. ``iss`` equals the configured issuer exactly; ``aud`` contains the gateway's audience;
   ``exp`` and ``nbf`` hold with a small leeway; ``exp``, ``iat``, ``iss``, ``sub`` are required.
5. ``typ``, when present (Keycloak sets it), must be ``Bearer``: ID and refresh tokens are refused.

A token that passed every check is remembered (keyed by its SHA-256) until its own ``exp``, so a
viewer fetching hundreds of instances with one token pays for the signature check once. ``exp`` and
``nbf`` are re-checked against the clock on every use; the cache is bounded and holds principals,
never the tokens themselves.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import jwt
from jwt import PyJWK, PyJWKSet

from compliance.auth.interfaces import Principal
from compliance.errors import AuthenticationError, UpstreamUnavailable

#: Algorithms that may ever be configured. Symmetric ones are deliberately absent.
SUPPORTED_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "PS384", "PS512"})


class JwksCache:
    """The realm's signing keys, fetched over HTTP and cached by ``kid``."""

    def __init__(
        self,
        jwks_url: str,
        *,
        client: httpx.AsyncClient | None = None,
        min_refresh_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = jwks_url
        self._client = client
        self._min_refresh = min_refresh_seconds
        self._clock = clock
        self._keys: dict[str, PyJWK] = {}
        self._declared_alg: dict[str, str] = {}
        self._last_fetch: float | None = None
        self._lock = asyncio.Lock()

    def load(self, jwks: dict[str, Any]) -> None:
        """Replace the cached keys with a JWKS document (used after a fetch, and by tests)."""
        keyset = PyJWKSet.from_dict(jwks)
        self._keys = {k.key_id: k for k in keyset.keys if k.key_id and (k.public_key_use in (None, "sig"))}
        # The algorithm each key declares for itself ("alg" member, RFC 7517 4.4), when it does.
        self._declared_alg = {
            str(k["kid"]): str(k["alg"]) for k in jwks.get("keys", []) if "kid" in k and "alg" in k
        }

    def declared_algorithm(self, kid: str) -> str | None:
        return self._declared_alg.get(kid)

    async def _fetch(self) -> None:
        client = self._client or httpx.AsyncClient(timeout=5.0)
        try:
            resp = await client.get(self._url)
            resp.raise_for_status()
            self.load(resp.json())
        except (httpx.HTTPError, ValueError, jwt.PyJWKSetError) as exc:
            raise UpstreamUnavailable("the identity provider's signing keys could not be fetched") from exc
        finally:
            self._last_fetch = self._clock()
            if self._client is None:
                await client.aclose()

    async def get(self, kid: str) -> PyJWK | None:
        key = self._keys.get(kid)
        if key is not None:
            return key
        async with self._lock:
            key = self._keys.get(kid)
            if key is not None:
                return key
            now = self._clock()
            if self._last_fetch is None or now - self._last_fetch >= self._min_refresh:
                await self._fetch()
            return self._keys.get(kid)


class OidcTokenVerifier:
    """Verifies Keycloak access tokens and maps their claims to a :class:`Principal`."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        jwks: JwksCache,
        algorithms: Sequence[str] = ("RS256", "ES256", "PS256"),
        leeway_seconds: int = 30,
        clock: Callable[[], float] = time.time,
        cache_size: int = 10_000,
    ) -> None:
        bad = set(algorithms) - SUPPORTED_ALGORITHMS
        if bad:
            raise ValueError(f"refusing to accept token algorithms {sorted(bad)}: only asymmetric ones")
        self._issuer = issuer
        self._audience = audience
        self._jwks = jwks
        self._algorithms = list(algorithms)
        self._leeway = leeway_seconds
        self._clock = clock
        self._verified: OrderedDict[bytes, tuple[float, float | None, Principal]] = OrderedDict()
        self._cache_size = cache_size

    async def verify(self, token: str) -> Principal:
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        hit = self._verified.get(digest)
        if hit is not None:
            exp, nbf, principal = hit
            now = self._clock()
            if exp + self._leeway > now and (nbf is None or nbf - self._leeway <= now):
                self._verified.move_to_end(digest)
                return principal
            del self._verified[digest]
        principal, exp, nbf = await self._verify_uncached(token)
        if self._cache_size:
            self._verified[digest] = (exp, nbf, principal)
            while len(self._verified) > self._cache_size:
                self._verified.popitem(last=False)
        return principal

    async def _verify_uncached(self, token: str) -> tuple[Principal, float, float | None]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthenticationError("the bearer token is malformed") from exc
        alg = header.get("alg")
        if alg not in self._algorithms:
            raise AuthenticationError(f"token algorithm {alg!r} is not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthenticationError("the token names no signing key")
        key = await self._jwks.get(kid)
        if key is None:
            raise AuthenticationError("the token was signed by an unknown key")
        declared = self._jwks.declared_algorithm(kid)
        if declared is not None and declared != alg:
            raise AuthenticationError("the token's algorithm does not match its signing key")
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                # Time claims are checked below against the injected clock (the only authority on
                # time here, so tests control it and production behaves identically).
                options={"require": ["exp", "iat", "iss", "sub", "aud"], "verify_iat": False,
                         "verify_exp": False, "verify_nbf": False},
            )
            now = self._clock()
            try:
                exp = float(claims["exp"])
                nbf = float(claims["nbf"]) if "nbf" in claims else None
            except (TypeError, ValueError) as exc:
                raise jwt.InvalidTokenError("non-numeric time claim") from exc
            if exp + self._leeway <= now:
                raise jwt.ExpiredSignatureError("expired")
            if nbf is not None and nbf - self._leeway > now:
                raise jwt.ImmatureSignatureError("not yet valid")
        except jwt.ExpiredSignatureError as exc:
            raise AuthenticationError("the token has expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise AuthenticationError("the token is not yet valid") from exc
        except jwt.InvalidIssuerError as exc:
            raise AuthenticationError("the token was issued by another issuer") from exc
        except jwt.InvalidAudienceError as exc:
            raise AuthenticationError("the token is not meant for this service") from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthenticationError("the token's signature does not verify") from exc
        except jwt.PyJWTError as exc:
            raise AuthenticationError("the token is not valid") from exc
        typ = claims.get("typ")
        if typ is not None and str(typ).lower() != "bearer":
            raise AuthenticationError("only access tokens are accepted")
        return principal_from_claims(claims), exp, nbf


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    realm_roles = (claims.get("realm_access") or {}).get("roles") or []
    groups = claims.get("groups") or []
    pou = claims.get("purpose_of_use") or []
    if isinstance(pou, str):
        pou = [pou]
    return Principal(
        subject=str(claims["sub"]),
        username=str(claims.get("preferred_username") or claims["sub"]),
        roles=frozenset(str(r) for r in realm_roles),
        groups=tuple(str(g) for g in groups),
        client_id=claims.get("azp") or claims.get("client_id"),
        purpose_of_use=tuple(str(p) for p in pou),
        token_id=claims.get("jti"),
        expires_at=int(claims["exp"]),
    )


def unverified_username(token: str) -> str | None:
    """The username a (refused) token claims, for the security-alert record only. Never trusted."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    name = claims.get("preferred_username") or claims.get("sub")
    return str(name)[:256] if name else None
