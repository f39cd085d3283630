"""The permission is decided before the request body is read for meaning.

Since the reshape (issue 13) every API route states its permission as one dependency
(``compliance.api.deps.RequirePermission``), which FastAPI settles before it validates the body. A caller
without the permission who sends a body the route would refuse is answered 403 and the attempt is a
110113 Security Alert, as any other refusal; it learns nothing of what a valid request looks like. A caller
with the permission sending the same body gets the validation error, and no alert.
"""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import dump

from .conftest import AuditIndex, Gateway, bearer

pytestmark = pytest.mark.integration

#: (route, a body the route refuses, a user without the permission, a user with it)
CASES = [
    ("/api/v1/exports", {"project": 7, "studies": "not a list"}, "alice", "rob"),
    ("/api/v1/keys/shred-requests", {"patient": ["not", "an", "id"]}, "rob", "ada"),
]


@pytest.mark.parametrize("path,body,outsider,member", CASES)
def test_a_caller_without_the_permission_is_refused_before_the_body_is_judged(
        gateway: Gateway, audit: AuditIndex, tokens, path: str, body: dict[str, object], outsider: str,
        member: str) -> None:
    refused = httpx.post(gateway.url + path, json=body, headers=bearer(tokens[outsider]), timeout=30)
    assert refused.status_code == 403, refused.text[:500]
    assert refused.json()["error"] == "forbidden", refused.text[:500]
    alerts = audit.wait_for(1, **{"event.id": "110113", "user.name": outsider, "object.ids": f"api:{path}"})
    assert alerts, dump(alerts)

    judged = httpx.post(gateway.url + path, json=body, headers=bearer(tokens[member]), timeout=30)
    assert judged.status_code in (400, 422), judged.text[:500]
    assert judged.headers["content-type"].startswith("application/json")
    assert not audit.search(**{"event.id": "110113", "user.name": member, "object.ids": f"api:{path}"})
