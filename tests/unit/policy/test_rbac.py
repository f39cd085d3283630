from __future__ import annotations

import pytest

from compliance.auth.interfaces import Principal
from compliance.config import PROJECT_ROOT
from compliance.errors import ConfigurationError
from compliance.policy.rbac import RbacPolicy

POLICY = RbacPolicy.from_file(PROJECT_ROOT / "policies" / "rbac.yaml")


def who(*roles: str) -> Principal:
    return Principal(subject="s", username="u", roles=frozenset(roles))


@pytest.mark.parametrize(
    "role,permission,allowed",
    [
        ("clinician", "dicomweb:study:search", True),
        ("clinician", "dicomweb:study:read", True),
        ("clinician", "dicomweb:study:store", False),
        ("radiologist", "dicomweb:study:read", True),
        ("technologist", "dicomweb:study:store", True),
        ("researcher", "dicomweb:study:search", False),
        ("researcher", "dicomweb:study:read", False),
        ("researcher", "dicomweb:study:store", False),
        ("privacy-officer", "dicomweb:study:read", False),
        ("admin", "dicomweb:study:read", False),
        ("data-steward", "dicomweb:study:read", False),
    ],
)
def test_shipped_policy(role, permission, allowed):
    d = POLICY.decide(who(role), permission)
    assert d.allowed is allowed
    assert d.permission == permission


def test_researchers_get_no_dicomweb_permission_at_all():
    assert not any(p.startswith("dicomweb:") for p in POLICY.permissions_of(who("researcher")))


def test_deny_by_default_for_unknown_roles_and_permissions():
    assert not POLICY.decide(who(), "dicomweb:study:read").allowed
    assert not POLICY.decide(who("superuser"), "dicomweb:study:read").allowed
    assert not POLICY.decide(who("clinician"), "dicomweb:study:delete").allowed


def test_denial_explains_itself():
    d = POLICY.decide(who("researcher"), "dicomweb:study:read")
    assert "dicomweb:study:read" in d.reason


@pytest.mark.parametrize(
    "data",
    [
        None,
        {"roles": {}},
        {"version": 2, "roles": {}},
        {"version": 1, "roles": {"clinician": "dicomweb:study:read"}},
        {"version": 1, "roles": {"clinician": ["dicomweb:study"]}},
        {"version": 1, "roles": {"clinician": ["DICOMWEB:*:*"]}},
        {"version": 1, "roles": [], "extra": 1},
    ],
)
def test_malformed_policy_refused(data):
    with pytest.raises(ConfigurationError):
        RbacPolicy.from_mapping(data)
