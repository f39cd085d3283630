"""Authentication contracts: who the caller is.

A verified bearer token becomes a :class:`Principal`; nothing downstream ever sees the raw token,
and the token is never forwarded to the archive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from compliance.errors import AuthenticationError

__all__ = ["AuthenticationError", "Principal", "TokenVerifier"]


@dataclass(frozen=True)
class Principal:
    """The verified identity behind a request."""

    subject: str
    username: str
    roles: frozenset[str] = field(default_factory=frozenset)
    groups: tuple[str, ...] = ()
    #: The OAuth client the token was issued to (``azp``): the viewer, AI service or CLI.
    client_id: str | None = None
    #: Purpose of use asserted in the token, if the realm issues one (IHE PurposeOfUse).
    purpose_of_use: tuple[str, ...] = ()
    token_id: str | None = None
    expires_at: int | None = None


class TokenVerifier(Protocol):
    async def verify(self, token: str) -> Principal:
        """Return the principal, or raise :class:`AuthenticationError`."""
        ...
