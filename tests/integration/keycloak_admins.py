"""A second administrator for the tests of the two-person shred, created in Keycloak for the test only.

The demo realm (deploy/keycloak/imaging-realm.json) has one administrator, ada. Changing the realm
file restarts Keycloak for everybody, so the second one is created at test time through Keycloak's
admin REST API (Keycloak's own administrator, from the local stack's ``secrets.env``; the gateway's
settings never hold it), given the realm role ``admin``, and deleted afterwards.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from keycloak import KeycloakAdmin

from compliance.config import load_settings

from .conftest import Stack


@dataclass(frozen=True)
class TemporaryUser:
    username: str
    password: str
    user_id: str


def keycloak_admin(stack: Stack) -> KeycloakAdmin:
    values = dict(line.split("=", 1) for line in (load_settings().stack_dir / "secrets.env").read_text().splitlines()
                  if "=" in line and not line.startswith("#"))
    return KeycloakAdmin(server_url=stack.keycloak_url.rstrip("/") + "/", username="admin",
                         password=values["KEYCLOAK_ADMIN_PASSWORD"], realm_name="imaging", user_realm_name="master")


@contextmanager
def temporary_realm_user(stack: Stack, prefix: str, realm_role: str) -> Iterator[TemporaryUser]:
    """A user of the ``imaging`` realm holding ``realm_role``, with a random password; deleted on exit."""
    admin = keycloak_admin(stack)
    username = f"{prefix}-{uuid.uuid4().hex[:8]}"
    password = secrets.token_urlsafe(18)
    user_id = admin.create_user({
        "username": username, "enabled": True, "firstName": "Second", "lastName": "Admin",
        "email": f"{username}@example.org", "emailVerified": True, "requiredActions": [],
        "credentials": [{"type": "password", "value": password, "temporary": False}]})
    try:
        admin.assign_realm_roles(user_id, [admin.get_realm_role(realm_role)])
        yield TemporaryUser(username, password, user_id)
    finally:
        admin.delete_user(user_id)
