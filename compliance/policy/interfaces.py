"""Authorization contracts: may this principal do this action on this resource?"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from compliance.auth.interfaces import Principal
from compliance.errors import PermissionDenied

__all__ = ["Decision", "PermissionDenied", "PolicyDecisionPoint"]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    permission: str
    #: Why: which role granted it, or why it was refused. Recorded in the audit event.
    reason: str


class PolicyDecisionPoint(Protocol):
    def decide(self, principal: Principal, permission: str, resource: str | None = None) -> Decision: ...
