"""Role-based decisions from ``policies/rbac.yaml``; deny by default.

The file is validated when it is loaded (unknown keys, a non-list of permissions, a malformed
permission name are refused at start-up), so a typo cannot silently widen or narrow access.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import yaml

from compliance.auth.interfaces import Principal
from compliance.errors import ConfigurationError
from compliance.policy.interfaces import Decision

_PERMISSION = re.compile(r"^[a-z][a-z0-9-]*:[a-z][a-z0-9-]*:[a-z][a-z0-9-]*$")


class RbacPolicy:
    """A :class:`~compliance.policy.interfaces.PolicyDecisionPoint` over a role -> permissions map."""

    def __init__(self, grants: Mapping[str, frozenset[str]]) -> None:
        self._grants = dict(grants)

    @classmethod
    def from_file(cls, path: Path) -> RbacPolicy:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigurationError(f"cannot read RBAC policy {path}: {exc}") from exc
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_mapping(cls, data: object, *, source: str = "<policy>") -> RbacPolicy:
        if not isinstance(data, dict) or set(data) - {"version", "roles"} or data.get("version") != 1:
            raise ConfigurationError(f"{source}: expected keys 'version: 1' and 'roles'")
        roles = data.get("roles")
        if not isinstance(roles, dict):
            raise ConfigurationError(f"{source}: 'roles' must map role names to permission lists")
        grants: dict[str, frozenset[str]] = {}
        for role, perms in roles.items():
            if not isinstance(perms, list) or not all(isinstance(p, str) for p in perms):
                raise ConfigurationError(f"{source}: role {role!r} must list permissions")
            for p in perms:
                if not _PERMISSION.match(p):
                    raise ConfigurationError(f"{source}: role {role!r}: malformed permission {p!r}")
            grants[str(role)] = frozenset(perms)
        return cls(grants)

    def permissions_of(self, principal: Principal) -> frozenset[str]:
        out: set[str] = set()
        for role in principal.roles:
            out |= self._grants.get(role, frozenset())
        return frozenset(out)

    def decide(self, principal: Principal, permission: str, resource: str | None = None) -> Decision:
        granting = sorted(r for r in principal.roles if permission in self._grants.get(r, ()))
        if granting:
            return Decision(True, permission, f"granted by role {granting[0]}")
        return Decision(False, permission, f"no role of {principal.username!r} grants {permission}")
