"""A shred the archive cannot even start is still on the audit trail (pure logic, real SQLite outbox)."""

from __future__ import annotations

import pytest

from compliance.archive.operations import ApprovedShred, KeyOperations
from compliance.audit.atna import AuditSource
from compliance.audit.message import UserRef
from compliance.audit.recorder import AuditRecorder
from compliance.errors import UpstreamUnavailable


class UnreachableArchive:
    """The key client's surface a shred uses; the archive does not answer the study listing."""

    def __init__(self) -> None:
        self.shredded: list[str] = []

    async def patient_studies(self, patient_id):
        raise UpstreamUnavailable("the archive cannot be reached")

    async def shred(self, patient_id, study_uids):  # pragma: no cover - must not be reached
        self.shredded.append(patient_id)
        return {"destroyed": 1, "state": "shredded"}



async def test_shred_whose_study_listing_fails_is_audited_and_destroys_nothing(outbox):
    archive = UnreachableArchive()
    ops = KeyOperations(archive, AuditRecorder(outbox, AuditSource("gw", "site")), gateway_id="gw")
    admin = UserRef("sub-ada", "ada", "compliance-cli", ("admin",), "10.0.0.7")
    with pytest.raises(UpstreamUnavailable):
        await ops.execute_shred("PAT-9", admin, ApprovedShred("req-1", "bob", "ada"))
    assert archive.shredded == []
    (doc,) = [d for _, _, d in outbox.pending(10)]
    assert doc["event.id"] == "110113"
    assert doc["event.outcome"] == 8
    assert doc["patient.ids"] == ["PAT-9"]
    assert doc["user.name"] == "ada" and doc["source.address"] == "10.0.0.7"
    assert doc["event.outcome_description"].startswith(
        "crypto-shred request req-1 (asked by bob, approved by ada): not started: the archive could not list")
    assert "urn:compliance:shred-request:req-1" in doc["object.ids"]
