"""Encrypted archive: WADO asks the key custodian for the patient's erasure state (pure logic)."""

from __future__ import annotations

import httpx
import pytest

from compliance.audit.outbox import SqlAuditOutbox
from compliance.crypto.interfaces import KeyDestroyed
from compliance.db.migrate import upgrade
from compliance.db.session import make_engine
from compliance.dicomweb.interfaces import StudySummary
from compliance.dicomweb.routing import classify
from compliance.errors import UpstreamUnavailable

from .test_service_fail_closed import STUDY, FakeArchive, ctx, service


class FakeCustodian:
    def __init__(self, shredded: set[str]) -> None:
        self.shredded = shredded
        self.calls: list[tuple[str, str]] = []

    async def patient_state(self, patient_id: str) -> str:
        self.calls.append(("patient", patient_id))
        return "shredded" if patient_id in self.shredded else "live"

    async def study_state(self, study_uid: str) -> str:
        self.calls.append(("study", study_uid))
        return "live"

    async def verify_study(self, study_uid: str) -> dict:
        self.calls.append(("verify", study_uid))
        return {"failures": []}


class UnknownPatientArchive(FakeArchive):
    async def study_summary(self, study_uid):
        return StudySummary(study_uid, None, None)


@pytest.fixture
def outbox(tmp_path):
    url = f"sqlite:///{tmp_path / 'erasure.db'}"
    upgrade(url)
    box = SqlAuditOutbox(make_engine(url))
    yield box
    box.close()


def _with_custodian(outbox, archive, custodian):
    svc = service(outbox, archive)
    svc._erasure = custodian
    return svc


async def test_live_patient_costs_one_custodian_call_about_the_audited_patient(outbox):
    custodian = FakeCustodian(shredded=set())
    archive = FakeArchive()
    upstream = await _with_custodian(outbox, archive, custodian).retrieve(
        ctx("clinician"), classify("GET", f"/studies/{STUDY}"))
    assert upstream.status_code == 200
    assert custodian.calls == [("patient", "PID-1")]
    assert not archive.stream.closed
    await upstream.aclose()


async def test_shredded_patient_is_gone_and_no_byte_is_sent(outbox):
    custodian = FakeCustodian(shredded={"PID-1"})
    archive = FakeArchive()
    with pytest.raises(KeyDestroyed) as raised:
        await _with_custodian(outbox, archive, custodian).retrieve(
            ctx("clinician"), classify("GET", f"/studies/{STUDY}"))
    assert raised.value.detail["reason"] == "crypto-shredded"
    assert archive.stream.closed  # the upstream body was never handed on
    events = [row[2] for row in outbox.pending(10)]
    assert [(e["event.id"], e["event.outcome"]) for e in events] == [("110104", 4)]
    assert events[0]["patient.ids"] == ["PID-1"]


async def test_a_study_without_a_known_patient_asks_the_custodian_about_the_study(outbox):
    custodian = FakeCustodian(shredded=set())
    upstream = await _with_custodian(outbox, UnknownPatientArchive(), custodian).retrieve(
        ctx("clinician"), classify("GET", f"/studies/{STUDY}"))
    assert custodian.calls == [("study", STUDY)]
    await upstream.aclose()


class UnreachableCustodian(FakeCustodian):
    async def patient_state(self, patient_id: str) -> str:
        raise UpstreamUnavailable("the key custodian cannot be reached")

    async def verify_study(self, study_uid: str) -> dict:
        raise UpstreamUnavailable("the key custodian cannot be reached")


class FailingArchive(FakeArchive):
    async def send(self, method, path, *, query=None, headers=None, content=None):
        self.sent.append(path)
        return httpx.Response(500, headers={"content-type": "application/json"}, stream=self.stream)


async def test_a_failed_erasure_check_is_still_an_audited_attempt_and_sends_nothing(outbox):
    archive = FakeArchive()
    with pytest.raises(UpstreamUnavailable):
        await _with_custodian(outbox, archive, UnreachableCustodian(set())).retrieve(
            ctx("clinician"), classify("GET", f"/studies/{STUDY}"))
    assert archive.stream.closed
    events = [row[2] for row in outbox.pending(10)]
    assert [(e["event.id"], e["event.outcome"], e["patient.ids"]) for e in events] == [("110104", 8, ["PID-1"])]


async def test_a_failed_integrity_check_closes_the_archive_response_and_is_audited(outbox):
    archive = FailingArchive()
    custodian = FakeCustodian(shredded=set())
    custodian.verify_study = UnreachableCustodian(set()).verify_study  # type: ignore[method-assign]
    with pytest.raises(UpstreamUnavailable):
        await _with_custodian(outbox, archive, custodian).retrieve(
            ctx("clinician"), classify("GET", f"/studies/{STUDY}"))
    assert archive.stream.closed
    events = [row[2] for row in outbox.pending(10)]
    assert [(e["event.id"], e["event.outcome"]) for e in events] == [("110104", 8)]
