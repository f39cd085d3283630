"""The security suite (issue 12): attacks a hostile client, a local user or a careless operator would
try, each run against the real local stack (deploy/local/up), as the integration tests are.

The stack fixtures are the integration suite's own (one gateway per test session on a free port,
a fresh database and a private audit index prefix); ``tokens`` gives a real Keycloak token for each
demo user. Helpers every attack file needs live here, not copied into each file.
"""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import (  # noqa: F401 - fixtures and hooks re-exported for this suite
    AuditIndex,
    Gateway,
    Stack,
    audit,
    gateway,
    pytest_runtest_call,
    pytest_runtest_makereport,
    stack,
    start_gateway,
    stop_gateway,
)

DICOM_JSON = "application/dicom+json"
DEMO_USERS = ("alice", "rita", "tom", "rob", "priya", "ada")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def orthanc_has_instance(archive: Stack, sop_instance_uid: str) -> bool:
    """Whether the archive itself (not the gateway) holds this SOP Instance UID."""
    r = httpx.post(f"{archive.orthanc_url}/tools/lookup", content=sop_instance_uid, auth=archive.orthanc_auth,
                   timeout=10)
    r.raise_for_status()
    return any(item.get("Type") == "Instance" for item in r.json())


@pytest.fixture(scope="module")
def tokens(stack: Stack) -> dict[str, str]:  # noqa: F811 - the re-exported fixture
    return {u: stack.token(u) for u in DEMO_USERS}
