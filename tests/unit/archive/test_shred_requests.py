"""The two-person shred's state machine (compliance/archive/shred.py): a real SQLite database and
outbox, a fake archive that records what it was asked to destroy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError as SqlIntegrityError

from compliance.archive.models import ShredRequest
from compliance.archive.operations import KeyOperations
from compliance.archive.shred import (
    LegalHoldRefused,
    SelfApprovalRefused,
    ShredRequestNotFound,
    ShredRequests,
    ShredStateConflict,
)
from compliance.audit.atna import AuditSource
from compliance.audit.message import UserRef
from compliance.audit.recorder import AuditRecorder
from compliance.db.session import make_engine, make_session_factory
from compliance.errors import AuditFailure, ConfigurationError, InvalidRequest, UpstreamUnavailable

ADA = UserRef("sub-ada", "ada", "compliance-cli", ("admin",), "10.0.0.7")
BOB = UserRef("sub-bob", "bob", "compliance-cli", ("admin",), "10.0.0.8")
OS_ADA = UserRef("os:ada", "ada", "compliance-cli")
NO_HOLDS = "audit_events_years: 6\nlegal_holds: []\n"


class FakeArchive:
    """The key client's surface a shred uses."""

    def __init__(self) -> None:
        self.shredded: list[str] = []
        self.removed: list[str] = []
        self.fail_shred: BaseException | None = None

    async def patient_studies(self, patient_id):
        return [("1.2.3", "Doe^Jane", "ACC1")]

    async def shred(self, patient_id, study_uids):
        if self.fail_shred is not None:
            raise self.fail_shred
        self.shredded.append(patient_id)
        return {"destroyed": 1, "state": "shredded"}

    async def patient_state(self, patient_id):
        return "shredded" if patient_id in self.shredded else "live"

    async def remove_patient_from_index(self, patient_id):
        self.removed.append(patient_id)
        return 1


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def policy(tmp_path):
    path = tmp_path / "retention.yaml"
    path.write_text(NO_HOLDS)
    return path


@pytest.fixture
def archive():
    return FakeArchive()


@pytest.fixture
def engine(tmp_path, outbox):
    eng = make_engine(f"sqlite:///{tmp_path / 'outbox.db'}")  # the outbox fixture migrated it
    yield eng
    eng.dispose()


@pytest.fixture
def shreds(engine, outbox, archive, policy) -> ShredRequests:
    recorder = AuditRecorder(outbox, AuditSource("gw", "site"))
    ops = KeyOperations(archive, recorder, gateway_id="gw")  # type: ignore[arg-type]
    return ShredRequests(make_session_factory(engine), ops, recorder, gateway_id="gw",
                         retention_policy_file=policy, clock=Clock())


def events(outbox) -> list[dict]:
    return [d for _, _, d in outbox.pending(1000)]


def hold(policy, *patients: str) -> None:
    quoted = ", ".join(f'"{p}"' for p in patients)
    policy.write_text(f"audit_events_years: 6\nlegal_holds:\n  - id: LH-1\n    reason: litigation\n"
                      f"    patient_ids: [{quoted}]\n")


async def test_the_requester_cannot_approve_and_nothing_is_destroyed(shreds, archive, outbox):
    req = await shreds.request(ADA, "PAT-1", "erasure asked by the patient")
    assert req["state"] == "requested" and req["requested_by"] == {"id": "sub-ada", "username": "ada"}
    with pytest.raises(SelfApprovalRefused):
        await shreds.approve(req["id"], ADA, "me")
    assert archive.shredded == [] and archive.removed == []
    assert (await shreds.get(req["id"]))["state"] == "requested"
    asked, refused = events(outbox)
    assert asked["event.id"] == "110113" and asked["event.type_codes"] == ["110129"] and asked["event.outcome"] == 0
    assert asked["event.outcome_description"].startswith(f"crypto-shred request {req['id']}: asked by ada")
    assert asked["patient.ids"] == ["PAT-1"] and f"urn:compliance:shred-request:{req['id']}" in asked["object.ids"]
    assert refused["event.type_codes"] == ["110147"] and refused["event.outcome"] == 4
    assert refused["user.name"] == "ada" and refused["patient.ids"] == ["PAT-1"]


async def test_the_same_name_through_the_cli_is_the_same_person(shreds, archive):
    req = await shreds.request(OS_ADA, "PAT-1", "duplicate")
    with pytest.raises(SelfApprovalRefused):
        await shreds.approve(req["id"], ADA)
    assert archive.shredded == []


async def test_a_second_admin_approves_and_the_shred_runs_once(shreds, archive, outbox):
    req = await shreds.request(ADA, "PAT-1", "erasure asked by the patient")
    done = await shreds.approve(req["id"], BOB, "identity checked")
    assert done["state"] == "shredded" and done["decided_by"]["username"] == "bob"
    assert done["comment"] == "identity checked" and done["executed_at"] and done["decided_at"]
    assert done["shred"]["destroyed"] == 1 and done["shred"]["index_removed"] is True
    assert archive.shredded == ["PAT-1"] and archive.removed == ["PAT-1"]
    docs = events(outbox)
    assert [(d["event.id"], d["user.name"]) for d in docs] == [
        ("110113", "ada"), ("110113", "bob"), ("110113", "bob"), ("110105", "bob")]
    assert "approved by bob (asked by ada)" in docs[1]["event.outcome_description"]
    label = f"crypto-shred request {req['id']} (asked by ada, approved by bob)"
    assert docs[2]["event.outcome_description"].startswith(label + ": executing")
    assert docs[3]["event.outcome_description"].startswith(label + ": crypto-shredded")
    for again in (shreds.approve(req["id"], BOB), shreds.reject(req["id"], BOB, "late"),
                  shreds.execute(req["id"], BOB)):
        with pytest.raises(ShredStateConflict):
            await again
    assert archive.shredded == ["PAT-1"]


async def test_a_rejection_needs_a_reason_and_ends_the_request(shreds, archive, outbox):
    req = await shreds.request(ADA, "PAT-1", "erasure")
    with pytest.raises(InvalidRequest):
        await shreds.reject(req["id"], BOB, "   ")
    rejected = await shreds.reject(req["id"], ADA, "withdrawn")  # the requester may withdraw
    assert rejected["state"] == "rejected" and rejected["decided_by"]["username"] == "ada"
    with pytest.raises(ShredStateConflict):
        await shreds.approve(req["id"], BOB)
    assert archive.shredded == []
    assert "rejected by ada" in events(outbox)[-1]["event.outcome_description"]
    # the patient has no open request any more: a new one may be asked
    assert (await shreds.request(BOB, "PAT-1", "again"))["state"] == "requested"


async def test_one_open_request_per_patient(shreds):
    first = await shreds.request(ADA, "PAT-1", "erasure")
    with pytest.raises(ShredStateConflict) as raised:
        await shreds.request(BOB, "PAT-1", "erasure too")
    assert raised.value.detail == {"open_request": first["id"]}
    assert [r["id"] for r in await shreds.list_requests("requested")] == [first["id"]]


async def test_a_legal_hold_refuses_the_request_the_approval_and_the_execution(shreds, archive, outbox, policy):
    pending = await shreds.request(ADA, "PAT-2", "erasure")
    hold(policy, "PAT-1", "PAT-2")  # read at each decision: no restart
    with pytest.raises(LegalHoldRefused) as raised:
        await shreds.request(ADA, "PAT-1", "erasure")
    assert raised.value.detail == {"legal_holds": ["LH-1"]}
    assert await shreds.list_requests(None) == [await shreds.get(pending["id"])], "no request was created"
    with pytest.raises(LegalHoldRefused):
        await shreds.approve(pending["id"], BOB)
    assert (await shreds.get(pending["id"]))["state"] == "requested" and archive.shredded == []
    refusals = [d for d in events(outbox) if d["event.type_codes"] == ["110147"]]
    assert [(d["user.name"], d["patient.ids"]) for d in refusals] == [("ada", ["PAT-1"]), ("bob", ["PAT-2"])]
    assert all("under legal hold LH-1 (litigation)" in d["event.outcome_description"] for d in refusals)
    assert all(d["event.outcome"] == 4 for d in refusals)
    # the hold is lifted: the same request can now be approved
    policy.write_text(NO_HOLDS)
    assert (await shreds.approve(pending["id"], BOB))["state"] == "shredded"


async def test_unreadable_holds_refuse_the_shred(shreds, archive, outbox, policy):
    req = await shreds.request(ADA, "PAT-1", "erasure")
    policy.write_text("audit_events_years: 2\n")  # below the legal minimum: the loader refuses it
    with pytest.raises(ConfigurationError):
        await shreds.approve(req["id"], BOB)
    policy.write_text("- not a mapping\n")
    with pytest.raises(ConfigurationError):
        await shreds.request(BOB, "PAT-3", "erasure")
    assert archive.shredded == [] and (await shreds.get(req["id"]))["state"] == "requested"
    refusals = [d for d in events(outbox) if d["event.type_codes"] == ["110147"]]
    assert len(refusals) == 2 and all("legal holds cannot be read" in d["event.outcome_description"]
                                      for d in refusals)


async def test_a_failed_shred_stays_approved_and_execute_finishes_it(shreds, archive):
    req = await shreds.request(ADA, "PAT-1", "erasure")
    archive.fail_shred = UpstreamUnavailable("the archive cannot be reached")
    with pytest.raises(UpstreamUnavailable) as raised:
        await shreds.approve(req["id"], BOB)
    assert raised.value.detail["shred_request"] == req["id"] and raised.value.detail["state"] == "approved"
    assert (await shreds.get(req["id"]))["state"] == "approved"
    archive.fail_shred = None
    done = await shreds.execute(req["id"], ADA)
    assert done["state"] == "shredded" and archive.shredded == ["PAT-1"]
    other = await shreds.request(ADA, "PAT-9", "erasure")
    with pytest.raises(ShredStateConflict):
        await shreds.execute(other["id"], BOB)  # not approved: execute is no way around the approval


async def test_a_step_that_cannot_be_audited_is_undone(shreds, outbox, archive, monkeypatch):
    async def broken(entry):
        raise RuntimeError("disk full")

    monkeypatch.setattr(outbox, "record", broken)
    with pytest.raises(AuditFailure):
        await shreds.request(ADA, "PAT-1", "erasure")
    assert await shreds.list_requests(None) == []
    monkeypatch.undo()
    req = await shreds.request(ADA, "PAT-1", "erasure")
    monkeypatch.setattr(outbox, "record", broken)
    with pytest.raises(AuditFailure):
        await shreds.approve(req["id"], BOB)
    assert (await shreds.get(req["id"]))["state"] == "requested" and archive.shredded == []


@pytest.mark.parametrize("patient_id", ["", " PAT", "PAT\n", "A\\B", "P" * 65, "PAT\x00"])
async def test_malformed_input_is_refused_and_records_nothing(shreds, outbox, patient_id):
    with pytest.raises(InvalidRequest):
        await shreds.request(ADA, patient_id, "erasure")
    with pytest.raises(InvalidRequest):
        await shreds.request(ADA, "PAT-1", "  ")
    with pytest.raises(ShredRequestNotFound):
        await shreds.approve("no-such-id", BOB)
    with pytest.raises(InvalidRequest):
        await shreds.list_requests("pending")
    assert await shreds.list_requests(None) == [] and events(outbox) == []


def test_the_schema_refuses_an_approval_by_the_requester(engine):
    row = {"id": "r1", "patient_id": "P", "reason": "x", "state": "approved", "requested_by": "sub-ada",
           "requested_by_name": "ada", "requested_at": datetime.now(UTC), "decided_by": "sub-ada",
           "decided_by_name": "ada", "decided_at": datetime.now(UTC)}
    with pytest.raises(SqlIntegrityError), engine.begin() as conn:
        conn.execute(insert(ShredRequest), row)
    with engine.begin() as conn:  # a withdrawal by the requester is a rejection, which the schema allows
        conn.execute(insert(ShredRequest), {**row, "state": "rejected"})
