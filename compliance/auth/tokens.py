"""Local verification of OIDC access tokens (RFC 7519, RFC 9068) issued by Keycloak.

Every check happens in-process against the realm's JWKS, which is cached and re-fetched:

* when a token names a key id (``kid``) the cache does not know (key rotation), at most once per
  ``min_refresh_seconds`` so that a flood of forged ``kid`` values cannot turn the gateway into a
  JWKS-fetching amplifier;
* when the cached copy is older than ``max_age_seconds`` (before the next token is accepted), so a
  key the realm has removed stops verifying tokens within that bound, without a restart. If the
  identity provider cannot be reached then, the last copy stays in use for at most one more
  ``max_age_seconds`` (a Keycloak restart does not log everybody out); after that every token is
  refused (503) until the keys can be re-checked.

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
6. ``azp`` (the client the token was issued to) is one of the configured ``allowed_clients``: the
   clients people log in through. A client-credentials token of any other client of the realm (the
   gateway's own service account, a batch job's) carries the audience too, but is not a user.

A token that passed every check is remembered (keyed by its SHA-256) until its own ``exp``, so a
viewer fetching hundreds of instances with one token pays for the signature check once. ``exp`` and
``nbf`` are re-checked against the clock on every use, and so is the signing key: a remembered
verification whose key has left the JWKS (or whose ``kid`` now names other key material) is dropped
and the token verified afresh, which refuses it. The cache is bounded and holds principals, never
the tokens themselves.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import httpx
import jwt
from jwt import PyJWK, PyJWKSet

from compliance.auth.interfaces import Principal
from compliance.errors import AuthenticationError, ConfigurationError, UpstreamUnavailable

log = logging.getLogger(__name__)

#: Algorithms that may ever be configured. Symmetric ones are deliberately absent.
SUPPORTED_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "PS384", "PS512"})


@dataclass(frozen=True)
class SigningKey:
    """One key of the realm's JWKS: the key, the algorithm it declares for itself (RFC 7517 4.4)
    when it does, and a fingerprint of its published members (a ``kid`` re-used for other key
    material gets another fingerprint)."""

    kid: str
    jwk: PyJWK
    declared_alg: str | None
    fingerprint: bytes


def _fingerprint(member: dict[str, Any]) -> bytes:
    return hashlib.sha256(json.dumps(member, sort_keys=True, separators=(",", ":")).encode()).digest()


class JwksCache:
    """The realm's signing keys, fetched over HTTP and cached by ``kid`` for at most ``max_age_seconds``."""

    def __init__(
        self,
        jwks_url: str,
        *,
        client: httpx.AsyncClient | None = None,
        min_refresh_seconds: float = 10.0,
        max_age_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_age_seconds <= 0:
            raise ValueError("the JWKS must be re-checked after a positive time (max_age_seconds)")
        self._url = jwks_url
        self._client = client
        self._min_refresh = min_refresh_seconds
        self._max_age = max_age_seconds
        self._clock = clock
        self._keys: dict[str, SigningKey] = {}
        #: When the cached keys were last loaded (a successful fetch), and last asked for.
        self._loaded_at: float | None = None
        self._last_attempt: float | None = None
        self._lock = asyncio.Lock()
        self._on_removed: list[Callable[[frozenset[str]], None]] = []

    def on_keys_removed(self, callback: Callable[[frozenset[str]], None]) -> None:
        """Call ``callback`` with the key ids a reload no longer lists (rotated out of the realm)."""
        self._on_removed.append(callback)

    def load(self, jwks: dict[str, Any]) -> None:
        """Replace the cached keys with a JWKS document (used after a fetch, and by tests)."""
        keyset = PyJWKSet.from_dict(jwks)
        members = {str(k["kid"]): k for k in jwks.get("keys", []) if isinstance(k, dict) and "kid" in k}
        keys: dict[str, SigningKey] = {}
        for k in keyset.keys:
            if not k.key_id or k.public_key_use not in (None, "sig") or k.key_id not in members:
                continue
            member = members[k.key_id]
            keys[k.key_id] = SigningKey(k.key_id, k, str(member["alg"]) if "alg" in member else None,
                                        _fingerprint(member))
        removed = frozenset(kid for kid, old in self._keys.items()
                            if kid not in keys or keys[kid].fingerprint != old.fingerprint)
        self._keys = keys
        self._loaded_at = self._clock()
        for callback in self._on_removed if removed else ():
            callback(removed)

    def declared_algorithm(self, kid: str) -> str | None:
        key = self._keys.get(kid)
        return None if key is None else key.declared_alg

    async def _fetch(self) -> None:
        client = self._client or httpx.AsyncClient(timeout=5.0)
        try:
            resp = await client.get(self._url)
            resp.raise_for_status()
            self.load(resp.json())
        except (httpx.HTTPError, ValueError, jwt.PyJWKSetError) as exc:
            raise UpstreamUnavailable("the identity provider's signing keys could not be fetched") from exc
        finally:
            self._last_attempt = self._clock()
            if self._client is None:
                await client.aclose()

    def _fresh(self, now: float) -> bool:
        return self._loaded_at is not None and now - self._loaded_at < self._max_age

    async def key(self, kid: str) -> SigningKey | None:
        """The realm's key named ``kid`` as of at most ``max_age_seconds`` ago, or None.

        Raises :class:`UpstreamUnavailable` when the keys cannot be fetched and no usable copy is left.
        """
        key = self._keys.get(kid)
        if key is not None and self._fresh(self._clock()):
            return key
        async with self._lock:
            now = self._clock()
            key = self._keys.get(kid)
            if key is not None and self._fresh(now):
                return key  # another request refreshed the keys meanwhile
            if self._last_attempt is None or now - self._last_attempt >= self._min_refresh:
                try:
                    await self._fetch()
                except UpstreamUnavailable:
                    if key is None or not self._within_grace(now):
                        raise
                    log.warning("the identity provider's signing keys could not be re-checked; the last copy "
                                "stays in use until it is %.0f s old", 2 * self._max_age)
                    return key
            elif self._loaded_at is not None and not self._within_grace(now):
                raise UpstreamUnavailable("the identity provider's signing keys could not be re-checked")
            return self._keys.get(kid)

    def _within_grace(self, now: float) -> bool:
        return self._loaded_at is not None and now - self._loaded_at < 2 * self._max_age

    async def get(self, kid: str) -> PyJWK | None:
        key = await self.key(kid)
        return None if key is None else key.jwk


class _Remembered(NamedTuple):
    exp: float
    nbf: float | None
    principal: Principal
    kid: str
    fingerprint: bytes


class OidcTokenVerifier:
    """Verifies Keycloak access tokens and maps their claims to a :class:`Principal`."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        jwks: JwksCache,
        allowed_clients: Collection[str],
        algorithms: Sequence[str] = ("RS256", "ES256", "PS256"),
        leeway_seconds: int = 30,
        clock: Callable[[], float] = time.time,
        cache_size: int = 10_000,
    ) -> None:
        bad = set(algorithms) - SUPPORTED_ALGORITHMS
        if bad:
            raise ValueError(f"refusing to accept token algorithms {sorted(bad)}: only asymmetric ones")
        clients = frozenset(c.strip() for c in allowed_clients if c and c.strip())
        if not clients:
            raise ConfigurationError("no client may present tokens (COMPLIANCE_OIDC_ALLOWED_CLIENTS is empty): "
                                     "name the clients people log in through, e.g. compliance-cli")
        self._issuer = issuer
        self._audience = audience
        self._jwks = jwks
        self._allowed_clients = clients
        self._algorithms = list(algorithms)
        self._leeway = leeway_seconds
        self._clock = clock
        self._verified: OrderedDict[bytes, _Remembered] = OrderedDict()
        self._cache_size = cache_size
        jwks.on_keys_removed(self._forget_keys)

    def _forget_keys(self, kids: frozenset[str]) -> None:
        """Drop every remembered verification made with a key the realm no longer publishes."""
        for digest in [d for d, hit in self._verified.items() if hit.kid in kids]:
            del self._verified[digest]

    async def verify(self, token: str) -> Principal:
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        hit = self._verified.get(digest)
        if hit is not None:
            now = self._clock()
            if hit.exp + self._leeway > now and (hit.nbf is None or hit.nbf - self._leeway <= now):
                # the signing key must still be the realm's (the JWKS is re-checked every max age)
                key = await self._jwks.key(hit.kid)
                if key is not None and key.fingerprint == hit.fingerprint and digest in self._verified:
                    self._verified.move_to_end(digest)
                    return hit.principal
            self._verified.pop(digest, None)
        remembered = await self._verify_uncached(token)
        if self._cache_size:
            self._verified[digest] = remembered
            while len(self._verified) > self._cache_size:
                self._verified.popitem(last=False)
        return remembered.principal

    async def _verify_uncached(self, token: str) -> _Remembered:
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
        key = await self._jwks.key(kid)
        if key is None:
            raise AuthenticationError("the token was signed by an unknown key")
        if key.declared_alg is not None and key.declared_alg != alg:
            raise AuthenticationError("the token's algorithm does not match its signing key")
        try:
            claims = jwt.decode(
                token,
                key=key.jwk.key,
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
        azp = claims.get("azp")
        if not isinstance(azp, str) or not azp:
            raise AuthenticationError("the token names no client (azp): only tokens issued to an allowed "
                                      "client are accepted")
        if azp not in self._allowed_clients:
            raise AuthenticationError(f"tokens issued to client {azp[:64]!r} are not accepted by this service")
        return _Remembered(exp, nbf, principal_from_claims(claims), kid, key.fingerprint)


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
