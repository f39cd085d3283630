"""The user directory: accounts as the identity provider knows them (family name, enabled or not).

The audit detections ask it about the users they see in the trail (``same_family_name``,
``disabled_account``, compliance/audit/detection/rules.py). :class:`KeycloakDirectory` reads Keycloak's
admin API; :class:`StaticDirectory` is a fixed one for development and tests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from compliance.errors import UpstreamUnavailable


@dataclass(frozen=True)
class DirectoryUser:
    username: str
    family_name: str | None
    enabled: bool


class UserDirectory(Protocol):
    def lookup(self, username: str) -> DirectoryUser | None:
        """The account, or None when the directory does not know it."""
        ...


class StaticDirectory:
    """A fixed directory (development, unit tests of the rules)."""

    def __init__(self, users: Iterable[DirectoryUser] = ()) -> None:
        self._users = {u.username: u for u in users}

    def lookup(self, username: str) -> DirectoryUser | None:
        return self._users.get(username)


class KeycloakDirectory:
    """Accounts from Keycloak's admin API (python-keycloak), cached for ``ttl`` per username.

    It logs in with a confidential client's service account (client credentials grant) in the realm
    itself, whose only grants are realm-management ``view-users``/``query-users``: reading accounts
    must not need an administrator of the identity provider.
    """

    def __init__(self, server_url: str, realm: str, *, client_id: str, client_secret: str,
                 ttl: timedelta = timedelta(minutes=5),
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        from compliance.auth.service_account import ServiceAccountAdmin

        self._admin = ServiceAccountAdmin(server_url, realm, client_id=client_id, client_secret=client_secret,
                                          timeout=20)
        self._ttl = ttl
        self._clock = clock
        self._cache: dict[str, tuple[datetime, DirectoryUser | None]] = {}
        self._lock = threading.Lock()

    def lookup(self, username: str) -> DirectoryUser | None:
        now = self._clock()
        with self._lock:
            cached = self._cache.get(username)
            if cached is not None and now - cached[0] < self._ttl:
                return cached[1]
        try:
            users = self._admin.client().get_users({"username": username, "exact": True})
        except Exception as exc:  # python-keycloak raises its own errors and requests' ones
            raise UpstreamUnavailable(f"cannot read account {username!r} from Keycloak: {type(exc).__name__}") from exc
        match = next((u for u in users if str(u.get("username", "")).lower() == username.lower()), None)
        result = None if match is None else DirectoryUser(
            username=username, family_name=match.get("lastName") or None, enabled=bool(match.get("enabled", True)))
        with self._lock:
            self._cache[username] = (now, result)
        return result
