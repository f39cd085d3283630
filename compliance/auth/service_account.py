"""Keycloak's admin API as the gateway's own service account (client credentials in the realm itself).

The batch jobs read the directory (the detections: accounts) and the realm's login events
(``compliance audit import-logins``) with the gateway's confidential client. Its service account
holds only realm-management ``view-users``, ``query-users`` and ``view-events``
(``deploy/keycloak/imaging-realm.json``): nothing here needs, or could use, an administrator of the
identity provider.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keycloak import KeycloakAdmin

__all__ = ["ServiceAccountAdmin"]


class ServiceAccountAdmin:
    """A python-keycloak ``KeycloakAdmin`` logged in as the service account, made on first use."""

    def __init__(self, server_url: str, realm: str, *, client_id: str, client_secret: str,
                 timeout: float = 30) -> None:
        self._args: dict[str, Any] = dict(
            server_url=server_url.rstrip("/") + "/", client_id=client_id, client_secret_key=client_secret,
            realm_name=realm, user_realm_name=realm, timeout=timeout)
        self._admin: KeycloakAdmin | None = None
        self._lock = threading.Lock()

    def client(self) -> KeycloakAdmin:
        """The admin client (raises python-keycloak's or requests' errors when Keycloak refuses or is down)."""
        with self._lock:
            if self._admin is None:
                from keycloak import KeycloakAdmin

                self._admin = KeycloakAdmin(**self._args)
            return self._admin
