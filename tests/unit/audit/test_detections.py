"""Detection rules on given events, the policy file, and the job's review queue and alerts (SQLite)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, select

from compliance.audit.atna import AuditSource
from compliance.audit.codes import EventTypeCode, Outcome
from compliance.audit.detection.job import DetectionJob
from compliance.audit.detection.policy import DEFAULT_POLICY_FILE, DetectionPolicy
from compliance.audit.detection.rules import DetectionEngine, family_name
from compliance.audit.detection.window import Backlog
from compliance.audit.documents import to_document
from compliance.audit.events import instances_transferred_event, security_alert_event
from compliance.audit.message import PatientRef, StudyRef, UserRef
from compliance.audit.models import AuditOutboxRow
from compliance.audit.outbox import SqlAuditOutbox
from compliance.audit.recorder import AuditRecorder
from compliance.audit.review import SqlReviewQueue
from compliance.auth.directory import DirectoryUser, StaticDirectory
from compliance.db.migrate import upgrade
from compliance.db.session import make_engine
from compliance.errors import AuditFailure, ConfigurationError, Conflict, NotFound

SOURCE = AuditSource(source_id="compliance-gateway", enterprise_site_id="demo-hospital")
MONDAY = datetime(2025, 3, 3, tzinfo=UTC)


SMITH = PatientRef("P1", "Smith^Ann")
OPERATOR = UserRef("os:ops", "ops", "compliance-cli")


class NoBacklog:
    def unshipped(self) -> Backlog:
        return Backlog()


def access(user: str, when: datetime, patient: PatientRef = SMITH) -> dict:
    return to_document(instances_transferred_event(
        user=UserRef(f"sub-{user}", user, "viewer", ("clinician",), "10.0.0.1"), gateway_id="gw", source_id="orthanc",
        outcome=Outcome.SUCCESS, patients=[patient], studies=[StudyRef("1.2.3")], occurred_at=when), SOURCE)


def refused(address: str, when: datetime) -> dict:
    return to_document(security_alert_event(
        user=None, gateway_id="gw", alert_type=EventTypeCode.AUTHENTICATION_DECISION, description="bad token",
        resource="/x", source_address=address, occurred_at=when), SOURCE)


class ListQueries:
    """Returns the given documents for every search (each test feeds one rule its events)."""

    def __init__(self, docs: list[dict], aggregations: dict | None = None) -> None:
        self.docs = docs
        self.aggregations = aggregations or {}

    def iterate(self, search, **_):
        yield from sorted(self.docs, key=lambda d: d["@timestamp"])

    def aggregate(self, search, aggs):
        return self.aggregations


def policy(only: str, **overrides) -> DetectionPolicy:
    base = DetectionPolicy.from_file(DEFAULT_POLICY_FILE)
    rules = {name: (rule if name == only else type(rule)(False, rule.alert_type, rule.outcome, rule.options))
             for name, rule in base.rules.items()}
    if overrides:
        rule = rules[only]
        rules[only] = type(rule)(True, rule.alert_type, rule.outcome, {**rule.options, **overrides})
    return DetectionPolicy(**{**base.__dict__, "rules": rules})


def test_the_shipped_policy_loads() -> None:
    p = DetectionPolicy.from_file(DEFAULT_POLICY_FILE)
    assert set(p.rules) == {"after_hours", "volume_spike", "same_family_name", "vip_access", "disabled_account",
                            "failed_auth_burst"}
    assert "VIP-DEMO-001" in p.vip_patients
    assert p.rules["failed_auth_burst"].alert_type == EventTypeCode.AUTHENTICATION_DECISION


@pytest.mark.parametrize("data", [
    {"version": 2},
    {"version": 1, "typo": 1},
    {"version": 1, "timezone": "Mars/Olympus"},
    {"version": 1, "rules": {"unknown_rule": {}}},
    {"version": 1, "rules": {"vip_access": {"alert_type": "999"}}},
    {"version": 1, "rules": {"failed_auth_burst": {"threshold": 0, "window_seconds": 60}}},
    {"version": 1, "rules": {"after_hours": {"business_hours": {"start": "25:00"}}}},
])
def test_bad_policies_are_refused(data) -> None:
    with pytest.raises(ConfigurationError):
        DetectionPolicy.from_mapping(data)


def test_family_name_of_a_person_name() -> None:
    assert family_name("Yamada^Tarou=山田^太郎") == "Yamada"
    assert family_name("Doe") == "Doe"


def test_after_hours_groups_by_user_and_day() -> None:
    docs = [access("alice", MONDAY + timedelta(hours=2)), access("alice", MONDAY + timedelta(hours=23)),
            access("alice", MONDAY + timedelta(hours=10)), access("bob", MONDAY + timedelta(days=5, hours=11))]
    found = DetectionEngine(ListQueries(docs), policy("after_hours"), StaticDirectory()).detect(
        MONDAY, MONDAY + timedelta(days=7))
    assert [(f.user_name, f.dedup_key, len(f.evidence)) for f in found] == [
        ("alice", "alice|2025-03-03", 2), ("bob", "bob|2025-03-08", 1)]  # Saturday is outside business days


def test_failed_auth_burst_needs_the_threshold_within_the_window() -> None:
    docs = [refused("10.6.6.6", MONDAY + timedelta(seconds=20 * i)) for i in range(10)]
    docs += [refused("10.7.7.7", MONDAY + timedelta(seconds=100 * i)) for i in range(10)]  # too slow
    found = DetectionEngine(ListQueries(docs), policy("failed_auth_burst", threshold=10, window_seconds=300),
                            StaticDirectory()).detect(MONDAY, MONDAY + timedelta(hours=1))
    assert [(f.source_address, len(f.evidence)) for f in found] == [("10.6.6.6", 10)]


def test_same_family_name_uses_the_directory() -> None:
    docs = [access("jdoe", MONDAY + timedelta(hours=9), PatientRef("P9", "DOE^John")),
            access("alice", MONDAY + timedelta(hours=9), PatientRef("P9", "DOE^John"))]
    directory = StaticDirectory([DirectoryUser("jdoe", "Doe", True), DirectoryUser("alice", "Clinician", True)])
    found = DetectionEngine(ListQueries(docs), policy("same_family_name"), directory).detect(
        MONDAY, MONDAY + timedelta(days=1))
    assert [(f.user_name, f.patient_id) for f in found] == [("jdoe", "P9")]


def test_vip_access_skips_exempt_users() -> None:
    vip = PatientRef("VIP-DEMO-001", "X^Y")
    docs = [access("alice", MONDAY + timedelta(hours=9), vip), access("drvip", MONDAY + timedelta(hours=9), vip)]
    p = policy("vip_access")
    p = DetectionPolicy(**{**p.__dict__, "vip_exempt_users": frozenset({"drvip"})})
    found = DetectionEngine(ListQueries(docs), p, StaticDirectory()).detect(MONDAY, MONDAY + timedelta(days=1))
    assert [(f.user_name, f.patient_id) for f in found] == [("alice", "VIP-DEMO-001")]


def days(counts: dict[str, int]) -> dict:
    return {"buckets": [{"key_as_string": k, "doc_count": v} for k, v in counts.items()]}


def test_volume_spike_against_the_users_own_baseline() -> None:
    baseline = {f"2025-02-{d:02d}": 10 for d in range(17, 29)} | {"2025-03-01": 10, "2025-03-02": 10}
    aggs = {"users": {"buckets": [
        {"key": {"user": "spiky"}, "days": days(baseline | {"2025-03-03": 51})},     # > 5 x 10
        {"key": {"user": "busy"}, "days": days(baseline | {"2025-03-03": 49})},      # below 5 x 10
        {"key": {"user": "new"}, "days": days({"2025-03-03": 50})},                   # no baseline, at the minimum
        {"key": {"user": "quiet"}, "days": days({"2025-03-03": 49})},                 # under min_events
    ]}}
    found = DetectionEngine(ListQueries([], aggs), policy("volume_spike", min_events=50, factor=5.0),
                            StaticDirectory()).detect(MONDAY + timedelta(hours=8), MONDAY + timedelta(hours=9))
    assert sorted(f.dedup_key for f in found) == ["new|2025-03-03", "spiky|2025-03-03"]


def test_disabled_account_from_the_directory() -> None:
    sample = {"hits": {"hits": [{"_source": access("gone", MONDAY + timedelta(hours=9))}]}}
    aggs = {"users": {"buckets": [{"key": {"user": "gone"}, "doc_count": 3, "sample": sample},
                                  {"key": {"user": "alice"}, "doc_count": 9, "sample": sample},
                                  {"key": {"user": "unknown"}, "doc_count": 1, "sample": sample}]}}
    directory = StaticDirectory([DirectoryUser("gone", None, False), DirectoryUser("alice", None, True)])
    found = DetectionEngine(ListQueries([], aggs), policy("disabled_account"), directory).detect(
        MONDAY, MONDAY + timedelta(days=1))
    assert [(f.user_name, f.dedup_key) for f in found] == [("gone", "gone|2025-03-03")]


@pytest.fixture()
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'd.db'}"
    upgrade(url)
    return make_engine(url)


def test_job_records_one_alert_per_new_finding_and_advances_the_watermark(db) -> None:
    now = datetime(2025, 3, 4, 6, 0, tzinfo=UTC)
    queue = SqlReviewQueue(db, clock=lambda: now)
    recorder = AuditRecorder(SqlAuditOutbox(db), SOURCE)
    p = policy("after_hours")
    docs = [access("alice", MONDAY + timedelta(hours=2))]
    job = DetectionJob(DetectionEngine(ListQueries(docs), p, StaticDirectory()), p, queue, recorder,
                       gateway_id="compliance-gateway", backlog=NoBacklog(), reader=OPERATOR,
                       audit_log_uri="http://es:9200/audit-*", clock=lambda: now)
    first = job.run(since=MONDAY, until=MONDAY + timedelta(days=1))
    assert len(first.opened) == 1
    second = job.run()  # starts at the watermark, finds the same event again: not queued twice
    assert second.window_start == MONDAY + timedelta(days=1)
    assert second.window_end == now - p.settle
    assert second.opened == ()
    with db.connect() as conn:
        rows = conn.execute(select(AuditOutboxRow.event_code, AuditOutboxRow.document)
                            .order_by(AuditOutboxRow.seq)).all()
    # each run's read is one 110101 (recorded before its alerts); the finding is one 110113, once
    assert [r.event_code for r in rows] == ["110101", "110113", "110101"]
    assert [json.loads(rows[i].document)["user.name"] for i in (0, 2)] == ["ops", "ops"]
    alert = json.loads(rows[1].document)
    assert alert["object.ids"][0] == "urn:compliance:detection:after_hours"
    assert alert["user.name"] == "alice" and alert["event.type_codes"] == ["110132"]
    item = queue.list(status="open")[0]
    assert item.alert_uuid == alert["event.uuid"] and item.evidence == (docs[0]["event.uuid"],)


def test_review_queue_acknowledge(db) -> None:
    queue = SqlReviewQueue(db)
    item = queue.add(rule="r", dedup_key="k", alert_uuid="u1", user_name="a", patient_id=None, summary="s",
                     evidence=["e"])
    assert queue.add(rule="r", dedup_key="k", alert_uuid="u2", user_name="a", patient_id=None, summary="s",
                     evidence=[]) is None
    assert item is not None
    acked = queue.acknowledge(item, by="priya", note="ok")
    assert (acked.status, acked.acknowledged_by, acked.acknowledged_at.tzinfo) == ("acknowledged", "priya", UTC)
    with pytest.raises(Conflict):
        queue.acknowledge(item, by="priya")
    with pytest.raises(NotFound):
        queue.acknowledge(12345, by="priya")
    assert queue.list(status="open") == [] and len(queue.list()) == 1


class AlertsFail:
    """Records reads (110101) in ``db``; alerts go to an outbox that cannot be written."""

    def __init__(self, db) -> None:
        self.ok = AuditRecorder(SqlAuditOutbox(db), SOURCE)
        self.broken = AuditRecorder(SqlAuditOutbox(create_engine("sqlite:///file:nowhere?mode=ro&uri=true")),
                                    SOURCE)

    def record_now(self, event) -> None:
        (self.broken if event.event_id.code.code == "110113" else self.ok).record_now(event)


def test_a_failed_alert_withdraws_its_review_item(db) -> None:
    queue = SqlReviewQueue(db)
    p = policy("after_hours")
    job = DetectionJob(DetectionEngine(ListQueries([access("alice", MONDAY + timedelta(hours=2))]), p,
                                       StaticDirectory()), p, queue, AlertsFail(db), gateway_id="gw",
                       backlog=NoBacklog(), reader=OPERATOR, audit_log_uri="http://es:9200/audit-*")
    with pytest.raises(AuditFailure):  # the recorder fails closed
        job.run(since=MONDAY, until=MONDAY + timedelta(days=1))
    assert queue.list() == [] and queue.last_window_end() is None  # the next run examines it again
    with db.connect() as conn:
        assert conn.execute(select(AuditOutboxRow.event_code)).scalars().all() == ["110101"]  # the read
