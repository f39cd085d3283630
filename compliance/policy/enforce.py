"""Enforcement: a decision, and the 110113 Security Alert when it is a denial.

Every route that guards something calls :func:`enforce`; a denial is recorded before the 403 is
raised, so no refusal goes unaudited, and the refused request never reaches what it asked for.
"""

from __future__ import annotations

from compliance.audit.codes import EventTypeCode, Outcome
from compliance.audit.events import security_alert_event
from compliance.audit.message import UserRef
from compliance.audit.recorder import AuditRecorder
from compliance.auth.interfaces import Principal
from compliance.errors import PermissionDenied
from compliance.policy.interfaces import PolicyDecisionPoint


def user_ref(principal: Principal, source_address: str | None) -> UserRef:
    return UserRef(
        user_id=principal.subject,
        username=principal.username,
        client_id=principal.client_id,
        roles=tuple(sorted(principal.roles)),
        source_address=source_address,
    )


async def enforce(
    policy: PolicyDecisionPoint,
    auditor: AuditRecorder,
    principal: Principal,
    permission: str,
    *,
    action: str,
    resource: str,
    source_address: str | None,
    gateway_id: str,
) -> None:
    """Return when allowed; otherwise audit the denial and raise :class:`PermissionDenied`."""
    decision = policy.decide(principal, permission, resource)
    if decision.allowed:
        return
    await auditor.record(
        security_alert_event(
            user=user_ref(principal, source_address),
            gateway_id=gateway_id,
            alert_type=EventTypeCode.ACCESS_CONTROL_DECISION,
            description=f"denied {action}: {decision.reason}",
            resource=resource,
            outcome=Outcome.MINOR_FAILURE,
        )
    )
    raise PermissionDenied(f"{principal.username} may not {action}", detail={"permission": permission})
