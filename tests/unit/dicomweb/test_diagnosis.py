"""Encrypted archive: a refused WADO or search asks the key custodian why (dicomweb/diagnosis.py).

A 2xx from the archive means it has just decrypted the study's files with a live key, so the
custodian is not asked; a 404 may be a study erased from the index (its tombstone says so), a 5xx a
shredded or corrupted file.
"""

from __future__ import annotations

import httpx
import pytest

from compliance.crypto.interfaces import KeyDestroyed
from compliance.dicomweb.routing import classify
from compliance.errors import UpstreamUnavailable

from .test_service_fail_closed import STUDY, FakeArchive, ctx, service


class FakeCustodian:
    def __init__(self, shredded: set[str], erased_studies: frozenset[str] = frozenset()) -> None:
        self.shredded = shredded
        self.erased_studies = erased_studies
        self.calls: list[tuple[str, str]] = []

    async def patient_state(self, patient_id: str) -> str:
        self.calls.append(("patient", patient_id))
        return "shredded" if patient_id in self.shredded else "live"

    async def study_state(self, study_uid: str) -> str:
        self.calls.append(("study", study_uid))
        return "shredded" if study_uid in self.erased_studies else "unknown_study"

    async def verify_study(self, study_uid: str) -> dict:
        self.calls.append(("verify", study_uid))
        return {"failures": []}

    async def recent_failures(self, within_seconds: float) -> list[dict]:
        self.calls.append(("failures", within_seconds))
        return []


def _with_custodian(outbox, archive, custodian):
    return service(outbox, archive, custodian)


class StatusArchive(FakeArchive):
    status = 500

    async def send(self, method, path, *, query=None, headers=None, content=None):
        self.sent.append(path)
        return httpx.Response(self.status, headers={"content-type": "application/json"}, stream=self.stream)


class FailingArchive(StatusArchive):
    status = 500


class GoneFromIndexArchive(StatusArchive):
    status = 404

    async def study_summary(self, study_uid):
        return None


async def test_a_successful_retrieve_costs_no_custodian_call(outbox):
    custodian = FakeCustodian(shredded=set())
    archive = FakeArchive()
    upstream = await _with_custodian(outbox, archive, custodian).retrieve(
        ctx("clinician"), classify("GET", f"/studies/{STUDY}"))
    assert upstream.status_code == 200
    assert custodian.calls == []
    assert not archive.stream.closed
    await upstream.aclose()


async def test_shredded_patient_is_gone_and_no_byte_is_sent(outbox):
    # between the key's destruction and the index deletion the archive cannot decrypt: 5xx
    custodian = FakeCustodian(shredded={"PID-1"})
    archive = FailingArchive()
    with pytest.raises(KeyDestroyed) as raised:
        await _with_custodian(outbox, archive, custodian).retrieve(
            ctx("clinician"), classify("GET", f"/studies/{STUDY}"))
    assert raised.value.detail["reason"] == "crypto-shredded"
    assert custodian.calls == [("patient", "PID-1")]
    assert archive.stream.closed  # the upstream body was never handed on
    events = [row[2] for row in outbox.pending(10)]
    assert [(e["event.id"], e["event.outcome"]) for e in events] == [("110104", 4)]
    assert events[0]["patient.ids"] == ["PID-1"]


async def test_a_study_erased_from_the_index_is_gone_by_its_tombstone(outbox):
    custodian = FakeCustodian(shredded=set(), erased_studies=frozenset({STUDY}))
    archive = GoneFromIndexArchive()
    with pytest.raises(KeyDestroyed):
        await _with_custodian(outbox, archive, custodian).retrieve(
            ctx("clinician"), classify("GET", f"/studies/{STUDY}"))
    assert custodian.calls == [("study", STUDY)]
    assert archive.stream.closed
    events = [row[2] for row in outbox.pending(10)]
    assert [(e["event.id"], e["event.outcome"], e["study.uids"]) for e in events] == [("110104", 4, [STUDY])]


async def test_an_unknown_study_stays_a_plain_404(outbox):
    custodian = FakeCustodian(shredded=set())
    upstream = await _with_custodian(outbox, GoneFromIndexArchive(), custodian).retrieve(
        ctx("clinician"), classify("GET", f"/studies/{STUDY}"))
    assert upstream.status_code == 404
    assert custodian.calls == [("study", STUDY)]
    await upstream.aclose()


class UnreachableCustodian(FakeCustodian):
    async def patient_state(self, patient_id: str) -> str:
        raise UpstreamUnavailable("the key custodian cannot be reached")

    async def verify_study(self, study_uid: str) -> dict:
        raise UpstreamUnavailable("the key custodian cannot be reached")


async def test_a_failed_erasure_check_is_still_an_audited_attempt_and_sends_nothing(outbox):
    archive = FailingArchive()
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


class ReportingCustodian(FakeCustodian):
    def __init__(self, result: str | None) -> None:
        super().__init__(shredded=set())
        self.result = result

    async def verify_study(self, study_uid: str) -> dict:
        self.calls.append(("verify", study_uid))
        return {"failures": [{"result": self.result}] if self.result else []}


def _searching(outbox, custodian):
    from compliance.audit.atna import AuditSource
    from compliance.audit.recorder import AuditRecorder
    from compliance.dicomweb.service import DicomwebService
    from compliance.policy.rbac import RbacPolicy

    policy = RbacPolicy.from_mapping({"version": 1, "roles": {"clinician": ["dicomweb:study:search"]}})
    auditor = AuditRecorder(outbox, AuditSource(source_id="gw", enterprise_site_id="site"), fail_closed=True)
    return DicomwebService(FailingArchive(), policy, auditor, gateway_id="gw", erasure=custodian)


def _search_events(outbox):
    return [(d["event.id"], d["event.outcome"], d.get("event.outcome_description")) for _, _, d in outbox.pending(10)]


async def test_a_study_search_failing_on_a_corrupted_file_is_an_integrity_alert(outbox):
    from compliance.archive.interfaces import ArchiveIntegrityError

    custodian = ReportingCustodian("decryption_failed")
    svc = _searching(outbox, custodian)
    with pytest.raises(ArchiveIntegrityError):
        await svc.search(ctx("clinician", path=f"/studies/{STUDY}/series"), classify("GET", f"/studies/{STUDY}/series"))
    assert ("verify", STUDY) in custodian.calls
    events = _search_events(outbox)
    assert [e[:2] for e in events] == [("110113", 8), ("110112", 8)]
    assert events[1][2] == "archive status 500: integrity"
    assert [d["patient.ids"] for _, _, d in outbox.pending(10)] == [["PID-1"], ["PID-1"]]


async def test_a_study_search_of_a_shredded_study_is_gone(outbox):
    custodian = ReportingCustodian("key_destroyed")
    svc = _searching(outbox, custodian)
    with pytest.raises(KeyDestroyed):
        await svc.search(ctx("clinician", path=f"/studies/{STUDY}/series"), classify("GET", f"/studies/{STUDY}/series"))
    assert [e[:2] for e in _search_events(outbox)] == [("110112", 4)]


async def test_a_study_search_failing_for_another_reason_stays_the_archives_failure(outbox):
    custodian = ReportingCustodian(None)
    svc = _searching(outbox, custodian)
    result = await svc.search(ctx("clinician", path=f"/studies/{STUDY}/series"),
                              classify("GET", f"/studies/{STUDY}/series"))
    assert result.status_code == 500  # the API answers 502 for it, as before
    assert [e[:2] for e in _search_events(outbox)] == [("110112", 8)]


class JournalCustodian(FakeCustodian):
    """The custodian's journal of reads that failed authentication (``/compliance/archive/failures``)."""

    def __init__(self, uuids: list[str]) -> None:
        super().__init__(shredded=set())
        self.uuids = uuids

    async def recent_failures(self, within_seconds: float) -> list[dict]:
        self.calls.append(("failures", within_seconds))
        return [{"uuid": u, "content_type": 1, "at": "2026-11-30T08:00:00+00:00"} for u in self.uuids]


BAD_FILE = "0b6c4f3e-6a53-4f43-9b7c-1d2e3f405162"


async def test_a_broad_search_failing_on_a_corrupted_file_is_an_integrity_alert_naming_the_file(outbox):
    from compliance.archive.interfaces import ArchiveIntegrityError
    from compliance.dicomweb.diagnosis import FAILURE_WINDOW_MARGIN

    custodian = JournalCustodian([BAD_FILE, BAD_FILE])
    with pytest.raises(ArchiveIntegrityError) as raised:
        await _searching(outbox, custodian).search(ctx("clinician", path="/instances"), classify("GET", "/instances"))
    assert raised.value.detail == {"files": 1}
    ((kind, window),) = custodian.calls  # no study to verify: only the journal is asked
    assert kind == "failures" and FAILURE_WINDOW_MARGIN <= window < FAILURE_WINDOW_MARGIN + 5
    events = _search_events(outbox)
    assert [e[:2] for e in events] == [("110113", 8), ("110112", 8)]
    assert BAD_FILE in events[0][2] and "integrity failure" in events[0][2]
    assert events[1][2] == "archive status 500: integrity"
    alert = outbox.pending(10)[0][2]
    assert alert["user.name"] == "alice" and alert.get("patient.ids", []) == []


async def test_a_broad_search_failing_with_no_integrity_failure_stays_the_archives_failure(outbox):
    custodian = FakeCustodian(shredded=set())
    result = await _searching(outbox, custodian).search(ctx("clinician", path="/studies"), classify("GET", "/studies"))
    assert result.status_code == 500  # the API answers 502 for it
    assert custodian.calls[0][0] == "failures"
    assert [e[:2] for e in _search_events(outbox)] == [("110112", 8)]


async def test_a_broad_search_whose_custodian_is_unreachable_stays_the_archives_failure(outbox):
    custodian = JournalCustodian([BAD_FILE])

    async def unreachable(within_seconds: float) -> list[dict]:
        raise UpstreamUnavailable("the key custodian cannot be reached")

    custodian.recent_failures = unreachable  # type: ignore[method-assign]
    result = await _searching(outbox, custodian).search(ctx("clinician", path="/studies"), classify("GET", "/studies"))
    assert result.status_code == 500
    assert [e[:2] for e in _search_events(outbox)] == [("110112", 8)]
