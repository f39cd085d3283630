"""The detection job's window (late-shipped events), its audited read (110101), and complete reading.

* the window ends at now minus settle, held back to the oldest event still waiting in the outbox, so
  an event shipped late is examined by the next run (which starts where this one ended) and raises
  its alert there, once;
* every run that reads records one 110101 Audit Log Used event, before its alerts; a failed read too;
* the rules read every event of their window (``search_after`` through the real query service), and
  every user (composite aggregation pages): nothing is cut off at a limit.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from lxml import etree
from sqlalchemy import select

from compliance.audit.atna import AuditSource
from compliance.audit.codes import EventTypeCode, Outcome
from compliance.audit.detection.job import DetectionJob, DetectionRun
from compliance.audit.detection.policy import DEFAULT_POLICY_FILE, DetectionPolicy
from compliance.audit.detection.rules import DetectionEngine
from compliance.audit.detection.window import Backlog, OutboxBacklog, detection_window
from compliance.audit.documents import to_document
from compliance.audit.events import instances_transferred_event, security_alert_event
from compliance.audit.message import PatientRef, StudyRef, UserRef
from compliance.audit.models import AuditOutboxRow
from compliance.audit.outbox import SqlAuditOutbox
from compliance.audit.queries import AuditQueryService, AuditSearch
from compliance.audit.recorder import AuditRecorder
from compliance.audit.review import SqlReviewQueue
from compliance.auth.directory import DirectoryUser, StaticDirectory
from compliance.db.migrate import upgrade
from compliance.db.session import make_engine
from compliance.errors import UpstreamUnavailable

SOURCE = AuditSource(source_id="compliance-gateway", enterprise_site_id="demo-hospital")
OPERATOR = UserRef("os:ops", "ops", "compliance-cli")
VIP = PatientRef("VIP-DEMO-001", "Important^Person")
MONDAY = datetime(2025, 3, 3, tzinfo=UTC)
NOW = MONDAY + timedelta(hours=12)
SETTLE = timedelta(seconds=60)
DAY = timedelta(hours=24)


def policy(only: str, **overrides: Any) -> DetectionPolicy:
    """The shipped policy with one rule enabled (``overrides``: its options)."""
    base = DetectionPolicy.from_file(DEFAULT_POLICY_FILE)
    rules = {name: type(rule)(name == only, rule.alert_type, rule.outcome,
                              {**rule.options, **overrides} if name == only else rule.options)
             for name, rule in base.rules.items()}
    return DetectionPolicy(**{**base.__dict__, "rules": rules})


# --------------------------------------------------------------------------- the window (pure)


def window(**kw: Any):
    args: dict[str, Any] = {"now": NOW, "settle": SETTLE, "initial_lookback": DAY, "backlog": Backlog()}
    return detection_window(**(args | kw))


def test_without_a_backlog_the_window_runs_from_the_watermark_to_now_minus_settle() -> None:
    w = window(last_end=NOW - timedelta(minutes=10))
    assert (w.start, w.end, w.requested_end, w.held_back) == (NOW - timedelta(minutes=10), NOW - SETTLE,
                                                              NOW - SETTLE, None)
    first = window()  # no run before: the initial look-back
    assert (first.start, first.end) == (NOW - SETTLE - DAY, NOW - SETTLE)


def test_an_unshipped_event_older_than_the_end_holds_the_end_back_to_its_time() -> None:
    late = NOW - timedelta(minutes=7)
    backlog = Backlog(pending=3, oldest=late)
    w = window(last_end=NOW - timedelta(minutes=10), backlog=backlog)
    assert (w.start, w.end, w.requested_end, w.held_back) == (NOW - timedelta(minutes=10), late, NOW - SETTLE,
                                                              backlog)
    # the next run, once it is shipped, starts exactly there: the late event is in [start, end)
    after = window(now=NOW + timedelta(minutes=5), last_end=w.end)
    assert after.start == late < after.end and after.held_back is None


def test_an_explicit_until_is_held_back_too_and_a_first_run_looks_back_from_the_held_end() -> None:
    late = NOW - timedelta(hours=2)
    w = window(until=NOW + DAY, backlog=Backlog(1, late))
    assert (w.start, w.end, w.requested_end) == (late - DAY, late, NOW + DAY)


def test_a_backlog_younger_than_the_end_holds_nothing_back() -> None:
    w = window(last_end=NOW - timedelta(minutes=10), backlog=Backlog(5, NOW - timedelta(seconds=2)))
    assert (w.end, w.held_back) == (NOW - SETTLE, None)


def test_held_back_before_the_watermark_the_window_is_empty() -> None:
    w = window(last_end=NOW - timedelta(minutes=10), backlog=Backlog(1, NOW - timedelta(hours=1)))
    assert w.empty and w.end == NOW - timedelta(hours=1)


def test_the_window_is_cut_to_milliseconds_like_the_timestamps_it_compares() -> None:
    odd = NOW - timedelta(minutes=7, microseconds=123_456)
    w = window(last_end=NOW - timedelta(minutes=10, microseconds=999), backlog=Backlog(1, odd))
    assert w.end.microsecond % 1000 == 0 and w.start.microsecond % 1000 == 0
    assert w.end <= odd < w.end + timedelta(milliseconds=1)


# --------------------------------------------------------------------------- the job over a fake trail


def vip_access(user: str, when: datetime) -> dict:
    return to_document(instances_transferred_event(
        user=UserRef(f"sub-{user}", user, "viewer", ("clinician",), "10.0.0.1"), gateway_id="gw", source_id="orthanc",
        outcome=Outcome.SUCCESS, patients=[VIP], studies=[StudyRef("1.2.3")], occurred_at=when), SOURCE)


class Trail:
    """The repository (shipped events, searched by time) and the outbox backlog (recorded, not shipped)."""

    def __init__(self) -> None:
        self.shipped: list[dict] = []
        self.pending: list[dict] = []
        self.calls: list[str] = []

    # ShippingBacklog
    def unshipped(self) -> Backlog:
        self.calls.append("backlog")
        times = [datetime.fromisoformat(d["@timestamp"].replace("Z", "+00:00")) for d in self.pending]
        return Backlog(len(times), min(times) if times else None)

    def ship(self) -> None:
        self.shipped += self.pending
        self.pending = []

    def refresh(self) -> None:
        self.calls.append("refresh")

    # the query service, as far as the vip rule uses it: time range and patients
    def iterate(self, search: AuditSearch, **_: Any) -> Iterator[dict]:
        self.calls.append("read")
        for doc in sorted(self.shipped, key=lambda d: (d["@timestamp"], d["event.uuid"])):
            when = datetime.fromisoformat(doc["@timestamp"].replace("Z", "+00:00"))
            if (search.start is None or when >= search.start) and (search.end is None or when < search.end) \
                    and (not search.patients or set(search.patients) & set(doc["patient.ids"])):
                yield doc

    def aggregate(self, search: AuditSearch, aggs: dict) -> dict:
        return {}


@pytest.fixture()
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'd.db'}"
    upgrade(url)
    return make_engine(url)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def make_job(db, trail: Trail, clock: Clock, p: DetectionPolicy | None = None,
             queries: Any = None) -> tuple[DetectionJob, SqlReviewQueue]:
    p = p or policy("vip_access")
    queue = SqlReviewQueue(db, clock=clock)
    job = DetectionJob(DetectionEngine(queries or trail, p, StaticDirectory()), p, queue,
                       AuditRecorder(SqlAuditOutbox(db), SOURCE), gateway_id="compliance-gateway", backlog=trail,
                       reader=OPERATOR, audit_log_uri="http://es:9200/audit-*", refresh=trail.refresh, clock=clock)
    return job, queue


def outbox_events(db) -> list[dict]:
    with db.connect() as conn:
        return [json.loads(d) for d in conn.execute(select(AuditOutboxRow.document).order_by(AuditOutboxRow.seq))
                .scalars()]


def test_an_event_shipped_late_is_examined_by_the_next_run_and_raises_its_alert_once(db) -> None:
    trail, clock = Trail(), Clock(NOW)
    job, queue = make_job(db, trail, clock)
    early = vip_access("eve", NOW - timedelta(minutes=30))
    late = vip_access("mallory", NOW - timedelta(minutes=20))  # recorded; the repository is down
    trail.shipped.append(early)
    trail.pending.append(late)

    first = job.run()
    assert (first.window_end, first.requested_end) == (NOW - timedelta(minutes=20), NOW - SETTLE)
    assert first.held_back == Backlog(1, NOW - timedelta(minutes=20))
    assert [f.user_name for f in first.findings] == ["eve"]
    assert first.to_json_obj()["held_back"] == {"pending_events": 1,
                                                "oldest_pending": (NOW - timedelta(minutes=20)).isoformat()}

    trail.ship()  # the repository is back, long after settle_seconds
    clock.now = NOW + timedelta(minutes=5)
    second = job.run()
    assert second.window_start == first.window_end and second.held_back is None
    assert [(f.rule, f.user_name, f.evidence) for f in second.findings] == [
        ("vip_access", "mallory", (late["event.uuid"],))]
    assert len(second.opened) == 1

    clock.now = NOW + timedelta(minutes=10)
    third = job.run()  # nothing new; and re-examining the same window queues nothing twice
    again = job.run(since=second.window_start, until=second.window_end)
    assert (third.findings, third.opened, len(again.findings), again.opened) == ((), (), 1, ())
    items = sorted((i.rule, i.user_name, i.evidence) for i in queue.list())
    assert items == [("vip_access", "eve", (early["event.uuid"],)), ("vip_access", "mallory", (late["event.uuid"],))]
    alerts = [d for d in outbox_events(db) if d["event.id"] == "110113"]
    assert sorted(a["user.name"] for a in alerts) == ["eve", "mallory"]


def test_the_outbox_is_looked_at_before_the_refresh_and_the_refresh_before_any_read(db) -> None:
    trail = Trail()
    trail.shipped.append(vip_access("eve", NOW - timedelta(minutes=30)))
    job, _ = make_job(db, trail, Clock(NOW))
    job.run(since=NOW - timedelta(hours=1))
    assert trail.calls[:3] == ["backlog", "refresh", "read"]


def test_each_run_that_reads_records_one_110101_before_its_alerts(db) -> None:
    trail, clock = Trail(), Clock(NOW)
    trail.shipped += [vip_access("eve", NOW - timedelta(minutes=30)), vip_access("bob", NOW - timedelta(minutes=29))]
    job, _ = make_job(db, trail, clock)
    run = job.run(since=NOW - timedelta(hours=1))
    events = outbox_events(db)
    assert [e["event.id"] for e in events] == ["110101", "110113", "110113"]
    used = events[0]
    assert run.audit_log_used == used["event.uuid"] == run.to_json_obj()["audit_log_used"]
    assert (used["user.id"], used["user.name"], used["client.id"], used["event.outcome"]) == (
        "os:ops", "ops", "compliance-cli", 0)
    assert used["object.ids"] == ["http://es:9200/audit-*"]
    assert "examined 2 event(s)" in used["event.outcome_description"]
    detail = etree.fromstring(used["atna.xml"].encode()).find(".//ParticipantObjectDetail[@type='Query']")
    assert detail is not None  # the query, base64 in the detail's value
    query = json.loads(base64.b64decode(detail.attrib["value"]))
    assert (query["command"], query["from"], query["to"]) == (
        "audit detect", run.window_start.isoformat(), run.window_end.isoformat())


def test_a_run_with_an_empty_window_reads_nothing_and_records_no_read(db) -> None:
    trail = Trail()
    trail.pending.append(vip_access("mallory", NOW - timedelta(hours=3)))
    job, queue = make_job(db, trail, Clock(NOW))
    run = job.run(since=NOW - timedelta(hours=1))  # held back before its start
    assert run.window_end == NOW - timedelta(hours=3) and run.findings == () and run.audit_log_used is None
    assert "read" not in trail.calls and outbox_events(db) == [] and queue.last_window_end() is None
    assert run.to_json_obj()["held_back"]["pending_events"] == 1


class Unreachable(Trail):
    def iterate(self, search: AuditSearch, **_: Any) -> Iterator[dict]:
        yield vip_access("eve", NOW - timedelta(minutes=30))
        raise UpstreamUnavailable("the audit repository (Elasticsearch) is unreachable")


def test_a_failed_read_is_recorded_with_its_reason_and_moves_no_watermark(db) -> None:
    trail = Unreachable()
    job, queue = make_job(db, trail, Clock(NOW))
    with pytest.raises(UpstreamUnavailable):
        job.run()
    [used] = outbox_events(db)
    assert (used["event.id"], used["event.outcome"]) == ("110101", 8)
    assert "unreachable" in used["event.outcome_description"]
    assert queue.last_window_end() is None and queue.list() == []


def test_the_outbox_backlog_is_the_unshipped_rows_and_their_oldest_event_time(db) -> None:
    outbox = SqlAuditOutbox(db)
    recorder = AuditRecorder(outbox, SOURCE)
    assert OutboxBacklog(db).unshipped() == Backlog(0, None)
    for minutes in (5, 50, 20):
        recorder.record_now(instances_transferred_event(
            user=OPERATOR, gateway_id="gw", source_id="orthanc", outcome=Outcome.SUCCESS, patients=[VIP],
            studies=[StudyRef("1.2.3")], occurred_at=NOW - timedelta(minutes=minutes)))
    assert OutboxBacklog(db).unshipped() == Backlog(3, NOW - timedelta(minutes=50))
    outbox.mark_shipped_seqs([2])  # the oldest one reached the repository
    assert OutboxBacklog(db).unshipped() == Backlog(2, NOW - timedelta(minutes=20))


# --------------------------------------------------------------------------- nothing is cut off


class PagingClient:
    """An Elasticsearch stand-in for the real query service: ``count`` refused authentications from one
    address, one a second, generated page by page (sorted, ``search_after``), never held in memory."""

    def __init__(self, count: int, start: datetime) -> None:
        self.count = count
        self.start_ms = int(start.timestamp() * 1000)
        self.requests: list[dict] = []

    def doc(self, i: int) -> dict:
        when = datetime.fromtimestamp((self.start_ms + 1000 * i) / 1000, UTC)
        return {"@timestamp": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "event.uuid": f"{i:08d}", "event.id": "110113", "source.address": "10.6.6.6",
                "event.type_codes": ["110143"]}

    def search(self, index: str, **body: Any) -> dict:
        self.requests.append(body)
        after = body.get("search_after")
        first = 0 if after is None else (int(after[0]) - self.start_ms) // 1000 + 1
        hits = [{"_source": self.doc(i), "sort": [self.start_ms + 1000 * i, f"{i:08d}"]}
                for i in range(first, min(self.count, first + int(body["size"])))]
        return {"hits": {"hits": hits}}


def test_a_rule_reads_every_event_of_its_window_past_any_former_limit() -> None:
    count = 200_123  # more than the 200,000 a rule used to read at most (the rest was dropped silently)
    client = PagingClient(count, MONDAY)
    engine = DetectionEngine(AuditQueryService(client, "audit"),  # type: ignore[arg-type]
                             policy("failed_auth_burst", threshold=10, window_seconds=300), StaticDirectory())
    [burst] = engine.detect(MONDAY, MONDAY + timedelta(days=3))
    assert engine.examined == {"failed_auth_burst": count}
    assert burst.summary.startswith(f"{count} refused authentications from 10.6.6.6")
    assert len(burst.evidence) == 50 and burst.evidence[0] == "00000000"
    assert len(client.requests) > count // 5000 and all("search_after" in r for r in client.requests[1:])


def refused(address: str, when: datetime, claim: str = "guess") -> dict:
    return to_document(security_alert_event(
        user=None, gateway_id="gw", alert_type=EventTypeCode.AUTHENTICATION_DECISION, description="bad token",
        resource="/x", source_address=address, alternative_user_id=claim, occurred_at=when), SOURCE)


class Docs:
    def __init__(self, docs: list[dict]) -> None:
        self.docs = docs

    def iterate(self, search: AuditSearch, **_: Any) -> Iterator[dict]:
        yield from sorted(self.docs, key=lambda d: (d["@timestamp"], d["event.uuid"]))


def test_bursts_are_split_by_a_quiet_window_and_a_burst_before_the_window_is_not_repeated() -> None:
    start = MONDAY + timedelta(hours=1)
    before = [refused("10.6.6.6", start - timedelta(seconds=200) + timedelta(seconds=5 * i)) for i in range(12)]
    first = [refused("10.6.6.6", start + timedelta(minutes=10, seconds=10 * i), f"u{i}") for i in range(10)]
    second = [refused("10.6.6.6", start + timedelta(minutes=30, seconds=10 * i)) for i in range(15)]
    other = [refused("10.7.7.7", start + timedelta(minutes=11, seconds=10 * i)) for i in range(9)]  # one short
    engine = DetectionEngine(Docs(before + first + second + other),  # type: ignore[arg-type]
                             policy("failed_auth_burst", threshold=10, window_seconds=300), StaticDirectory())
    found = engine.detect(start, start + timedelta(hours=1))
    assert [(f.dedup_key, len(f.evidence)) for f in found] == [
        (f"10.6.6.6|{first[0]['event.uuid']}", 10), (f"10.6.6.6|{second[0]['event.uuid']}", 15)]
    assert "(claimed users: u0, u1, u2, u3, u4, u5, u6, u7, u8, u9)" in found[0].summary


class UserPages:
    """Composite aggregation pages over ``users`` users (answers ``after`` like Elasticsearch)."""

    def __init__(self, users: int) -> None:
        self.names = [f"user{i:05d}" for i in range(users)]
        self.requests: list[dict] = []

    def aggregate(self, search: AuditSearch, aggs: dict) -> dict:
        composite = aggs["users"]["composite"]
        self.requests.append(composite)
        after = (composite.get("after") or {}).get("user")
        rest = [n for n in self.names if after is None or n > after][: composite["size"]]
        sample = {"hits": {"hits": [{"_source": {"@timestamp": "2025-03-03T09:00:00.000Z", "event.uuid": "e1",
                                                 "user.id": "s", "source.address": "10.0.0.1"}}]}}
        buckets = [{"key": {"user": n}, "doc_count": 2, "sample": sample} for n in rest]
        return {"users": {"buckets": buckets, **({"after_key": {"user": rest[-1]}} if rest else {})}}


def test_every_user_is_judged_however_many_there_are() -> None:
    pages = UserPages(12_345)  # a terms aggregation of size 10,000 dropped the rest silently
    directory = StaticDirectory([DirectoryUser("user00007", None, True),
                                 DirectoryUser("user12344", None, False)])  # the last one, on the last page
    engine = DetectionEngine(pages, policy("disabled_account"), directory)  # type: ignore[arg-type]
    found = engine.detect(MONDAY, MONDAY + timedelta(days=1))
    assert [f.user_name for f in found] == ["user12344"]
    assert engine.examined == {"disabled_account": 2 * 12_345}
    assert len(pages.requests) == 12_345 // 200 + 1


def test_the_run_reports_what_each_rule_read(db) -> None:
    trail = Trail()
    trail.shipped += [vip_access("eve", NOW - timedelta(minutes=30))]
    job, _ = make_job(db, trail, Clock(NOW))
    out = job.run(since=NOW - timedelta(hours=1)).to_json_obj()
    assert (out["examined"], out["findings"], out["rules"], out["held_back"]) == ({"vip_access": 1}, 1,
                                                                                  ["vip_access"], None)
    assert set(out) >= {"from", "to", "requested_to", "opened", "audit_log_used"}
    assert DetectionRun(NOW, NOW, (), ()).to_json_obj()["examined"] == {}  # a run that read nothing
