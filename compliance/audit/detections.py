"""Detections over the audit event stream: findings become 110113 alerts and review-queue items.

Rules and thresholds are data (``policies/detections.yaml``, restricted patients in
``policies/vip-patients.yaml``):

* ``after_hours``: an access to images outside the site's business hours (one finding per user and
  local day);
* ``volume_spike``: a user's accesses today far above their own daily mean over the previous
  ``baseline_days`` (``count >= min_events`` and ``count > factor * mean``);
* ``same_family_name``: a user accessing a patient whose DICOM family name is the user's family name
  (from the directory: Keycloak);
* ``vip_access``: any access to a restricted patient by a user not listed as exempt;
* ``disabled_account``: any activity recorded for an account the directory says is disabled (a
  token issued before the account was disabled is still valid until it expires);
* ``failed_auth_burst``: ``threshold`` refused authentications from one source address within
  ``window_seconds``: tokens the gateway refused (110113 / 110143) and logins Keycloak refused
  (110114 Login with a failure outcome, imported by ``compliance audit import-logins``).

How it runs: :class:`DetectionJob` is a batch job, ``compliance audit detect``, meant for cron or a
systemd timer. It is not a task inside the gateway because the gateway runs one process per core:
a batch job runs once, however many workers there are. Every finding has a dedup key (rule + user
+ day, ...), unique in ``audit_review_item``, so overlapping or repeated runs never queue a finding
twice. Time comes from an injected clock; nothing sleeps.

The window, and why no event is skipped (:func:`detection_window`): a run examines the events whose
time is in ``[start, end)``; ``start`` is the previous run's end (the watermark, table
``audit_detection_run``), ``end`` is now minus ``settle_seconds``, **held back to the time of the
oldest event still waiting in the outbox** (not yet shipped to every sink). Events reach
Elasticsearch asynchronously and possibly hours late (the repository was down), but an event is in
the outbox from the moment it is recorded until it is shipped, so:

1. an event recorded before the run looked at the outbox, and older than ``end``, is shipped: had it
   been pending, ``end`` would be at or before its time;
2. an event not yet recorded then is younger than ``now - settle_seconds``, hence than ``end``: events
   are built immediately before they are committed and the request waits for the commit, so
   ``settle_seconds`` (60 s) only has to exceed a commit's latency, not a shipping delay;
3. the run refreshes the indices after it looked at the outbox and before it reads, so everything
   Elasticsearch acknowledged (what the outbox counts as shipped) is searchable.

The next run starts exactly where this one ended, so every event is in exactly one window. While
the outbox has a backlog the watermark waits (the run says so: ``held_back`` in its JSON result, a
warning on the log) and catches up once the backlog is shipped. Nothing is re-examined, so late
events raise their findings in the run that first sees them, once.

Nothing is truncated either: the per-event rules page through every event of the window
(``search_after``) and keep per group only a count, the first event and at most
:data:`MAX_EVIDENCE` evidence ids, so memory does not grow with the window; the per-user rules page
through every user (composite aggregations). The run reports how many events each rule read.

Reading the trail for the detections is itself an access to the audit log: each run that reads
records one 110101 Audit Log Used event (the reader: the operator for the CLI, and whichever
service identity a scheduler would pass), durably, before any finding is raised; a run that fails
while reading records it with a failure outcome.

Findings are recorded like any event: through :class:`~compliance.audit.recorder.AuditRecorder`
into the outbox (hash-chained, shipped at least once). Their subject is the resource
``urn:compliance:detection:<rule>``; the patient-facing reports leave those alerts out.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from sqlalchemy import Engine, func, select

from compliance.audit.codes import Code, EventTypeCode, Outcome
from compliance.audit.events import audit_log_used_event, security_alert_event
from compliance.audit.message import PatientRef, UserRef
from compliance.audit.models import AuditOutboxRow
from compliance.audit.queries import AuditQueryService, AuditSearch
from compliance.audit.recorder import AuditRecorder
from compliance.audit.reports import DETECTION_RESOURCE_PREFIX
from compliance.audit.review import SqlReviewQueue
from compliance.config import PROJECT_ROOT
from compliance.db.base import table_of
from compliance.errors import ComplianceError, ConfigurationError, UpstreamUnavailable

__all__ = [
    "DETECTION_RESOURCE_PREFIX",
    "Backlog",
    "DetectionEngine",
    "DetectionJob",
    "DetectionPolicy",
    "DetectionRun",
    "DetectionWindow",
    "DirectoryUser",
    "Finding",
    "KeycloakDirectory",
    "OutboxBacklog",
    "StaticDirectory",
    "UserDirectory",
    "detection_window",
]

log = logging.getLogger(__name__)

DEFAULT_POLICY_FILE = PROJECT_ROOT / "policies" / "detections.yaml"
RULES = ("after_hours", "volume_spike", "same_family_name", "vip_access", "disabled_account", "failed_auth_burst")
_NOT_A_DETECTION = {"bool": {"must_not": {"prefix": {"object.ids": DETECTION_RESOURCE_PREFIX}}}}
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
#: Evidence (event uuids) kept per finding; the finding's summary counts every event.
MAX_EVIDENCE = 50
#: Users per page of the per-user aggregations (composite: every user is seen, page by page).
USER_PAGE_SIZE = 500
#: Distinct claimed user names kept per failed-authentication burst (the summary names ten).
_MAX_CLAIMS = 1000
_FIELDS = ["@timestamp", "event.uuid", "event.id", "user.id", "user.name", "patient.ids", "patient.names",
           "source.address", "event.type_codes"]


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class RuleSettings:
    enabled: bool
    alert_type: Code
    outcome: Outcome
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DetectionPolicy:
    timezone: ZoneInfo
    initial_lookback: timedelta
    settle: timedelta
    access_event_ids: tuple[str, ...]
    rules: Mapping[str, RuleSettings]
    vip_patients: frozenset[str] = frozenset()
    vip_exempt_users: frozenset[str] = frozenset()
    business_start: time = time(7, 0)
    business_end: time = time(19, 0)
    business_days: frozenset[int] = frozenset(range(5))

    def rule(self, name: str) -> RuleSettings | None:
        settings = self.rules.get(name)
        return settings if settings is not None and settings.enabled else None

    @classmethod
    def from_file(cls, path: Path = DEFAULT_POLICY_FILE) -> DetectionPolicy:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigurationError(f"cannot read detection policy {path}: {exc}") from exc
        vip: object = {}
        vip_file = ((data or {}).get("rules") or {}).get("vip_access", {}).get("patients_file")
        if vip_file:
            vip_path = (path.parent / str(vip_file)).resolve()
            try:
                vip = yaml.safe_load(vip_path.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigurationError(f"cannot read restricted patients {vip_path}: {exc}") from exc
        return cls.from_mapping(data, vip=vip, source=str(path))

    @classmethod
    def from_mapping(cls, data: object, *, vip: object = None, source: str = "<policy>") -> DetectionPolicy:
        def fail(msg: str) -> ConfigurationError:
            return ConfigurationError(f"{source}: {msg}")

        if not isinstance(data, dict) or data.get("version") != 1:
            raise fail("expected a mapping with 'version: 1'")
        known = {"version", "timezone", "initial_lookback_hours", "settle_seconds", "access_event_ids", "rules"}
        if set(data) - known:
            raise fail(f"unknown keys {sorted(set(data) - known)}")
        try:
            tz = ZoneInfo(str(data.get("timezone", "UTC")))
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise fail(f"unknown timezone {data.get('timezone')!r}") from exc
        codes = {c.code: c for c in EventTypeCode.all()}
        rules: dict[str, RuleSettings] = {}
        raw_rules = data.get("rules") or {}
        if not isinstance(raw_rules, dict) or set(raw_rules) - set(RULES):
            raise fail(f"'rules' must map rule names ({', '.join(RULES)}) to settings")
        for name, raw in raw_rules.items():
            if not isinstance(raw, dict):
                raise fail(f"rule {name!r} must be a mapping")
            alert = codes.get(str(raw.get("alert_type", "110132")))
            if alert is None:
                raise fail(f"rule {name!r}: alert_type must be a CID 403 code")
            try:
                outcome = Outcome(int(raw.get("outcome", 4)))
            except ValueError as exc:
                raise fail(f"rule {name!r}: outcome must be 0, 4, 8 or 12") from exc
            options = {k: v for k, v in raw.items() if k not in ("enabled", "alert_type", "outcome")}
            rules[name] = RuleSettings(bool(raw.get("enabled", True)), alert, outcome, options)
        after = rules.get("after_hours")
        start, end, days = time(7, 0), time(19, 0), frozenset(range(5))
        if after is not None:
            hours = after.options.get("business_hours") or {}
            try:
                start = time.fromisoformat(str(hours.get("start", "07:00")))
                end = time.fromisoformat(str(hours.get("end", "19:00")))
                days = frozenset(_DAYS.index(str(d).lower()[:3])
                                 for d in after.options.get("business_days", _DAYS[:5]))
            except ValueError as exc:
                raise fail(f"after_hours: {exc}") from exc
        for name, key in (("volume_spike", "baseline_days"), ("volume_spike", "min_events"),
                          ("failed_auth_burst", "threshold"), ("failed_auth_burst", "window_seconds")):
            if name in rules and not (isinstance(rules[name].options.get(key), int) and rules[name].options[key] > 0):
                raise fail(f"{name}: {key} must be a positive integer")
        patients: set[str] = set()
        exempt: set[str] = set()
        if vip:
            if not isinstance(vip, dict) or vip.get("version") != 1:
                raise fail("restricted patients: expected 'version: 1' and 'patients'")
            for entry in vip.get("patients") or []:
                pid = entry.get("id") if isinstance(entry, dict) else entry
                if not pid:
                    raise fail("restricted patients: every entry needs an id")
                patients.add(str(pid))
            exempt = {str(u) for u in vip.get("exempt_users") or []}
        return cls(
            timezone=tz,
            initial_lookback=timedelta(hours=float(data.get("initial_lookback_hours", 24))),
            settle=timedelta(seconds=float(data.get("settle_seconds", 60))),
            access_event_ids=tuple(str(e) for e in data.get("access_event_ids")
                                   or ("110103", "110104", "110105", "110106", "110107", "110112")),
            rules=rules, vip_patients=frozenset(patients), vip_exempt_users=frozenset(exempt),
            business_start=start, business_end=end, business_days=days,
        )


# --------------------------------------------------------------------------- the directory


@dataclass(frozen=True)
class DirectoryUser:
    username: str
    family_name: str | None
    enabled: bool


class UserDirectory(Protocol):
    def lookup(self, username: str) -> DirectoryUser | None:
        """The account, or None when the directory does not know it."""
        ...


class StaticDirectory:
    """A fixed directory (development, unit tests of the rules)."""

    def __init__(self, users: Iterable[DirectoryUser] = ()) -> None:
        self._users = {u.username: u for u in users}

    def lookup(self, username: str) -> DirectoryUser | None:
        return self._users.get(username)


class KeycloakDirectory:
    """Accounts from Keycloak's admin API (python-keycloak), cached for ``ttl`` per username.

    It logs in with a confidential client's service account (client credentials grant) in the realm
    itself, whose only grants are realm-management ``view-users``/``query-users``: reading accounts
    must not need an administrator of the identity provider.
    """

    def __init__(self, server_url: str, realm: str, *, client_id: str, client_secret: str,
                 ttl: timedelta = timedelta(minutes=5),
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        from compliance.auth.service_account import ServiceAccountAdmin

        self._admin = ServiceAccountAdmin(server_url, realm, client_id=client_id, client_secret=client_secret,
                                          timeout=20)
        self._ttl = ttl
        self._clock = clock
        self._cache: dict[str, tuple[datetime, DirectoryUser | None]] = {}
        self._lock = threading.Lock()

    def lookup(self, username: str) -> DirectoryUser | None:
        now = self._clock()
        with self._lock:
            cached = self._cache.get(username)
            if cached is not None and now - cached[0] < self._ttl:
                return cached[1]
        try:
            users = self._admin.client().get_users({"username": username, "exact": True})
        except Exception as exc:  # python-keycloak raises its own errors and requests' ones
            raise UpstreamUnavailable(f"cannot read account {username!r} from Keycloak: {type(exc).__name__}") from exc
        match = next((u for u in users if str(u.get("username", "")).lower() == username.lower()), None)
        result = None if match is None else DirectoryUser(
            username=username, family_name=match.get("lastName") or None, enabled=bool(match.get("enabled", True)))
        with self._lock:
            self._cache[username] = (now, result)
        return result


# --------------------------------------------------------------------------- findings


@dataclass(frozen=True)
class Finding:
    rule: str
    dedup_key: str
    summary: str
    user_name: str | None = None
    user_id: str | None = None
    patient_id: str | None = None
    source_address: str | None = None
    evidence: tuple[str, ...] = ()


def _ts(doc: Mapping[str, Any]) -> datetime:
    return datetime.fromisoformat(str(doc["@timestamp"]).replace("Z", "+00:00")).astimezone(UTC)


def _ids(doc: Mapping[str, Any], key: str) -> list[str]:
    value = doc.get(key)
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def family_name(person_name: str) -> str:
    """The family name component of a DICOM PN (PS3.5 6.2: ``Family^Given^...=ideographic=phonetic``)."""
    return person_name.split("=", 1)[0].split("^", 1)[0].strip()


class _Group:
    """The events of one finding-to-be, in time order: count, first event, evidence, patients seen.

    Bounded whatever the number of events: the first event, :data:`MAX_EVIDENCE` uuids and at most two
    distinct patients (enough to tell "exactly one patient" from "several").
    """

    __slots__ = ("count", "evidence", "first", "patients")

    def __init__(self) -> None:
        self.count = 0
        self.first: Mapping[str, Any] = {}
        self.evidence: list[str] = []
        self.patients: set[str] = set()

    def add(self, doc: Mapping[str, Any], patients: Iterable[str] = ()) -> None:
        if not self.count:
            self.first = doc
        self.count += 1
        if len(self.evidence) < MAX_EVIDENCE:
            self.evidence.append(str(doc["event.uuid"]))
        for pid in patients:
            if len(self.patients) >= 2:
                break
            self.patients.add(pid)


@dataclass
class _Burst:
    first_uuid: str
    first_time: datetime
    last_time: datetime
    count: int = 0
    evidence: list[str] = field(default_factory=list)
    claims: set[str] = field(default_factory=set)

    def add(self, when: datetime, uuid: str, claim: str | None) -> None:
        self.last_time = when
        self.count += 1
        if len(self.evidence) < MAX_EVIDENCE:
            self.evidence.append(uuid)
        if claim and len(self.claims) < _MAX_CLAIMS:
            self.claims.add(claim)


class DetectionEngine:
    def __init__(self, queries: AuditQueryService, policy: DetectionPolicy, directory: UserDirectory) -> None:
        self._queries = queries
        self._policy = policy
        self._directory = directory
        #: Events each rule read in the last :meth:`detect` (every one in its window: nothing is cut off).
        self.examined: dict[str, int] = {}

    def detect(self, start: datetime, end: datetime) -> list[Finding]:
        self.examined = {}
        findings: list[Finding] = []
        for name in RULES:
            if self._policy.rule(name) is not None:
                self.examined[name] = 0
                findings.extend(getattr(self, f"_{name}")(start, end))
        return findings

    # ------------------------------------------------------------------ helpers

    def _events(self, rule: str, search: AuditSearch, fields: Sequence[str] = _FIELDS) -> Iterator[dict[str, Any]]:
        """Every event matching ``search``, oldest first, page by page (``search_after``; no limit)."""
        for doc in self._queries.iterate(search, source_fields=list(fields)):
            self.examined[rule] += 1
            yield doc

    def _access_events(self, rule: str, start: datetime, end: datetime) -> Iterator[dict[str, Any]]:
        search = AuditSearch(event_types=(), start=start, end=end,
                             extra_filters=({"terms": {"event.id": list(self._policy.access_event_ids)}},
                                            {"exists": {"field": "user.name"}}))
        return self._events(rule, search)

    def _per_user(self, rule: str, search: AuditSearch, sub_aggs: dict[str, Any], *,
                  page_size: int = USER_PAGE_SIZE) -> Iterator[dict[str, Any]]:
        """One bucket per ``user.name`` with ``sub_aggs``, for every user (composite aggregation, paged).

        A ``terms`` aggregation would return its ``size`` largest users and drop the rest silently.
        """
        after: dict[str, Any] | None = None
        while True:
            composite: dict[str, Any] = {"size": page_size, "sources": [{"user": {"terms": {"field": "user.name"}}}]}
            if after is not None:
                composite["after"] = after
            result = self._queries.aggregate(search, {"users": {"composite": composite, "aggs": sub_aggs}})
            body = result.get("users") or {}
            buckets = list(body.get("buckets") or [])
            for bucket in buckets:
                self.examined[rule] += int(bucket.get("doc_count", 0))
                yield bucket
            after = body.get("after_key")
            if len(buckets) < page_size or not after:
                return

    def _local_day(self, moment: datetime) -> str:
        return moment.astimezone(self._policy.timezone).date().isoformat()

    # ------------------------------------------------------------------ rules

    def _after_hours(self, start: datetime, end: datetime) -> list[Finding]:
        p = self._policy
        groups: dict[tuple[str, str], _Group] = defaultdict(_Group)
        for doc in self._access_events("after_hours", start, end):
            local = _ts(doc).astimezone(p.timezone)
            inside = local.weekday() in p.business_days and p.business_start <= local.time() < p.business_end
            if not inside:
                groups[(str(doc["user.name"]), local.date().isoformat())].add(doc, _ids(doc, "patient.ids"))
        out = []
        for (user, day), group in sorted(groups.items()):
            first = _ts(group.first).astimezone(p.timezone)
            out.append(Finding(
                rule="after_hours", dedup_key=f"{user}|{day}",
                summary=f"{user} accessed images outside business hours on {day}: {group.count} event(s), "
                        f"first at {first:%H:%M} ({p.timezone.key})",
                user_name=user, user_id=group.first.get("user.id"),
                patient_id=next(iter(group.patients)) if len(group.patients) == 1 else None,
                source_address=group.first.get("source.address"),
                evidence=tuple(group.evidence)))
        return out

    def _volume_spike(self, start: datetime, end: datetime) -> list[Finding]:
        p = self._policy
        rule = p.rules["volume_spike"]
        baseline_days = int(rule.options["baseline_days"])
        factor = float(rule.options.get("factor", 5.0))
        min_events = int(rule.options["min_events"])
        tz = p.timezone
        # Every local day the window touches is judged on its full count so far.
        first_day = start.astimezone(tz).replace(hour=0, minute=0, second=0, microsecond=0)
        since = (first_day - timedelta(days=baseline_days)).astimezone(UTC)
        search = AuditSearch(start=since, end=end, extra_filters=(
            {"terms": {"event.id": list(p.access_event_ids)}}, {"exists": {"field": "user.name"}}))
        days_agg = {"days": {"date_histogram": {"field": "@timestamp", "calendar_interval": "1d",
                                                "time_zone": tz.key, "min_doc_count": 1, "format": "yyyy-MM-dd"}}}
        out = []
        judged_days: list[str] = []
        day = first_day
        while day < end.astimezone(tz):
            judged_days.append(day.date().isoformat())
            day += timedelta(days=1)
        # Day buckets per user stay under Elasticsearch's search.max_buckets per page.
        page = max(1, min(USER_PAGE_SIZE, 20_000 // (baseline_days + len(judged_days) + 1)))
        for bucket in self._per_user("volume_spike", search, days_agg, page_size=page):
            user = str(bucket["key"]["user"])
            counts = {str(b["key_as_string"]): int(b["doc_count"]) for b in bucket["days"]["buckets"]}
            for judged in judged_days:
                today = counts.get(judged, 0)
                judged_date = datetime.fromisoformat(judged).date()
                window = [(judged_date - timedelta(days=i)).isoformat() for i in range(1, baseline_days + 1)]
                mean = sum(counts.get(d, 0) for d in window) / baseline_days
                if today >= min_events and today > factor * mean:
                    out.append(Finding(
                        rule="volume_spike", dedup_key=f"{user}|{judged}",
                        summary=f"{user} made {today} accesses on {judged}, against a daily mean of {mean:.1f} "
                                f"over the previous {baseline_days} days (threshold x{factor:g}, min {min_events})",
                        user_name=user))
        return out

    def _same_family_name(self, start: datetime, end: datetime) -> list[Finding]:
        groups: dict[tuple[str, str, str], _Group] = defaultdict(_Group)
        families: dict[str, str | None] = {}
        for doc in self._access_events("same_family_name", start, end):
            user = str(doc["user.name"])
            if user not in families:
                account = self._directory.lookup(user)
                families[user] = family_name(account.family_name).casefold() if account and account.family_name \
                    else None
            mine = families[user]
            if not mine:
                continue
            ids = _ids(doc, "patient.ids")
            for name in _ids(doc, "patient.names"):
                if family_name(name).casefold() == mine:
                    patient = ids[0] if len(ids) == 1 else "?"
                    groups[(user, patient, self._local_day(_ts(doc)))].add(doc)
                    break
        return [Finding(rule="same_family_name", dedup_key=f"{user}|{patient}|{day}",
                        summary=f"{user} accessed images of a patient with the same family name "
                                f"({'patient ' + patient if patient != '?' else 'in a multi-patient result'}) "
                                f"on {day}: {group.count} event(s)",
                        user_name=user, user_id=group.first.get("user.id"),
                        patient_id=None if patient == "?" else patient,
                        source_address=group.first.get("source.address"),
                        evidence=tuple(group.evidence))
                for (user, patient, day), group in sorted(groups.items())]

    def _vip_access(self, start: datetime, end: datetime) -> list[Finding]:
        p = self._policy
        if not p.vip_patients:
            return []
        groups: dict[tuple[str, str, str], _Group] = defaultdict(_Group)
        search = AuditSearch(patients=tuple(sorted(p.vip_patients)), start=start, end=end,
                             extra_filters=({"exists": {"field": "user.name"}}, _NOT_A_DETECTION))
        for doc in self._events("vip_access", search):
            user = str(doc["user.name"])
            if user in p.vip_exempt_users:
                continue
            for pid in _ids(doc, "patient.ids"):
                if pid in p.vip_patients:
                    groups[(user, pid, self._local_day(_ts(doc)))].add(doc)
        return [Finding(rule="vip_access", dedup_key=f"{user}|{pid}|{day}",
                        summary=f"{user} accessed restricted patient {pid} on {day}: {group.count} event(s)",
                        user_name=user, user_id=group.first.get("user.id"), patient_id=pid,
                        source_address=group.first.get("source.address"),
                        evidence=tuple(group.evidence))
                for (user, pid, day), group in sorted(groups.items())]

    def _disabled_account(self, start: datetime, end: datetime) -> list[Finding]:
        search = AuditSearch(start=start, end=end, extra_filters=({"exists": {"field": "user.name"}},
                                                                   _NOT_A_DETECTION))
        sample = {"sample": {"top_hits": {"size": 20, "sort": [{"@timestamp": "asc"}],
                                          "_source": {"includes": _FIELDS}}}}
        out = []
        for bucket in self._per_user("disabled_account", search, sample, page_size=200):
            user = str(bucket["key"]["user"])
            account = self._directory.lookup(user)
            if account is None or account.enabled:
                continue
            docs = [h["_source"] for h in bucket["sample"]["hits"]["hits"]]
            day = self._local_day(_ts(docs[0])) if docs else self._local_day(start)
            out.append(Finding(rule="disabled_account", dedup_key=f"{user}|{day}",
                               summary=f"activity by disabled account {user}: {int(bucket['doc_count'])} event(s) "
                                       f"from {day}",
                               user_name=user, user_id=docs[0].get("user.id") if docs else None,
                               source_address=docs[0].get("source.address") if docs else None,
                               evidence=tuple(str(d["event.uuid"]) for d in docs)))
        return out

    def _failed_auth_burst(self, start: datetime, end: datetime) -> list[Finding]:
        """Streams the refused authentications: per source, the events of the last ``window`` until
        ``threshold`` of them fall within it (from ``start`` on), then the burst while the gaps stay
        within the window. Memory: one window of events per source at most, whatever the run covers."""
        rule = self._policy.rules["failed_auth_burst"]
        threshold = int(rule.options["threshold"])
        window = timedelta(seconds=int(rule.options["window_seconds"]))
        # Look back one window so a burst straddling two runs is still seen whole.
        # Refused tokens at the gateway (110113 Authentication Decision) and refused logins at
        # Keycloak (110114 with a failure outcome, imported by compliance audit import-logins).
        from compliance.audit.logins import refused_logins_query

        refused = {"bool": {"minimum_should_match": 1, "should": [
            {"bool": {"filter": [{"term": {"event.id": "110113"}},
                                 {"term": {"event.type_codes": EventTypeCode.AUTHENTICATION_DECISION.code}}]}},
            refused_logins_query(),
        ]}}
        search = AuditSearch(start=start - window, end=end, extra_filters=(refused,))
        recent: dict[str, deque[tuple[datetime, str, str | None]]] = defaultdict(deque)
        bursts: dict[str, _Burst] = {}
        done: list[tuple[str, _Burst]] = []
        for doc in self._events("failed_auth_burst", search, [*_FIELDS, "user.unverified_claim"]):
            source = str(doc.get("source.address") or "unknown")
            when, uuid = _ts(doc), str(doc["event.uuid"])
            claimed = doc.get("user.unverified_claim") or (
                doc.get("user.name") if doc.get("event.id") == "110114" else None)
            claim = str(claimed) if claimed else None
            burst = bursts.get(source)
            if burst is not None:
                if when - burst.last_time <= window:
                    burst.add(when, uuid, claim)
                    continue
                done.append((source, bursts.pop(source)))  # the burst ended: this event starts afresh
            events = recent[source]
            events.append((when, uuid, claim))
            while when - events[0][0] > window:
                events.popleft()
            if len(events) >= threshold and when >= start:
                burst = _Burst(first_uuid=events[0][1], first_time=events[0][0], last_time=when)
                for e in events:
                    burst.add(*e)
                bursts[source] = burst
                events.clear()
        done.extend(bursts.items())
        out = []
        for source, burst in sorted(done, key=lambda sb: (sb[0], sb[1].first_time)):
            claims = sorted(burst.claims)
            out.append(Finding(
                rule="failed_auth_burst", dedup_key=f"{source}|{burst.first_uuid}",
                summary=f"{burst.count} refused authentications from {source} between "
                        f"{burst.first_time:%Y-%m-%d %H:%M:%S} and {burst.last_time:%H:%M:%S} UTC"
                        + (f" (claimed users: {', '.join(claims[:10])})" if claims else ""),
                source_address=None if source == "unknown" else source,
                evidence=tuple(burst.evidence)))
        return out


# --------------------------------------------------------------------------- the window


@dataclass(frozen=True)
class Backlog:
    """Events recorded but not yet shipped to every sink: how many, and the time of the oldest."""

    pending: int = 0
    oldest: datetime | None = None


class ShippingBacklog(Protocol):
    def unshipped(self) -> Backlog:
        """The outbox's events still waiting to be shipped."""
        ...


_OUTBOX = table_of(AuditOutboxRow)


class OutboxBacklog:
    """The unshipped events of the SQL outbox (the one every gateway process and CLI records into)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def unshipped(self) -> Backlog:
        with self._engine.connect() as conn:
            count, oldest = conn.execute(select(func.count(), func.min(_OUTBOX.c.occurred_at))
                                         .where(_OUTBOX.c.shipped_at.is_(None))).one()
        if oldest is not None and oldest.tzinfo is None:  # SQLite: stored as UTC, returned naive
            oldest = oldest.replace(tzinfo=UTC)
        return Backlog(int(count or 0), oldest)


def _millis(moment: datetime) -> datetime:
    """``moment`` in UTC, cut to the millisecond: the precision of ``@timestamp`` and of the queries."""
    moment = moment.astimezone(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


@dataclass(frozen=True)
class DetectionWindow:
    start: datetime
    end: datetime
    #: The end asked for (``--until``, or now minus settle_seconds), before it was held back.
    requested_end: datetime
    #: The outbox backlog that held the end back (None: the end is the one asked for).
    held_back: Backlog | None = None

    @property
    def empty(self) -> bool:
        return self.start >= self.end


def detection_window(*, now: datetime, settle: timedelta, initial_lookback: timedelta, backlog: Backlog,
                     since: datetime | None = None, until: datetime | None = None,
                     last_end: datetime | None = None) -> DetectionWindow:
    """The events a run examines: ``[start, end)`` by event time.

    ``end`` is ``until`` (default ``now - settle``) but never later than the oldest event still waiting
    to be shipped: that event, and any shipped one after it, will be examined by a later run, which
    starts where this one ends. ``start`` is ``since``, else the previous run's end, else ``end`` minus
    the initial look-back. Both are cut to the millisecond (``@timestamp``'s precision), so the window
    a run reports is exactly the one it queried.
    """
    requested = _millis(until if until is not None else now - settle)
    end, held = requested, None
    if backlog.oldest is not None and _millis(backlog.oldest) < requested:
        end, held = _millis(backlog.oldest), backlog
    start = _millis(since if since is not None else last_end if last_end is not None else end - initial_lookback)
    return DetectionWindow(start, end, requested, held)


# --------------------------------------------------------------------------- the job


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


@dataclass(frozen=True)
class DetectionRun:
    window_start: datetime
    window_end: datetime
    findings: tuple[Finding, ...]
    #: Review item ids opened by this run (findings already queued are not repeated).
    opened: tuple[int, ...]
    #: The end asked for; later than ``window_end`` when unshipped events held the window back.
    requested_end: datetime | None = None
    held_back: Backlog | None = None
    #: Events read per rule (all of the window: nothing is cut off).
    examined: Mapping[str, int] = field(default_factory=dict)
    #: The uuid of the 110101 Audit Log Used event recording this run's read (None: nothing was read).
    audit_log_used: str | None = None

    def to_json_obj(self) -> dict[str, Any]:
        return {"from": _iso(self.window_start), "to": _iso(self.window_end),
                "findings": len(self.findings), "opened": list(self.opened),
                "rules": sorted({f.rule for f in self.findings}),
                "requested_to": _iso(self.requested_end or self.window_end),
                "held_back": None if self.held_back is None else {
                    "pending_events": self.held_back.pending, "oldest_pending": _iso(self.held_back.oldest)},
                "examined": dict(self.examined),
                "audit_log_used": self.audit_log_used}


class DetectionJob:
    """One detection run: the window, the audited read, the alerts, the watermark.

    ``reader`` is who reads the audit trail (recorded as the 110101 event's user: the operator for the
    CLI; a scheduler inside the gateway would pass the gateway's own service identity), and
    ``audit_log_uri`` the repository read. ``refresh`` makes everything Elasticsearch acknowledged
    searchable; it is called after the outbox was looked at and before the first read.
    """

    def __init__(self, engine: DetectionEngine, policy: DetectionPolicy, queue: SqlReviewQueue,
                 recorder: AuditRecorder, *, gateway_id: str, backlog: ShippingBacklog, reader: UserRef,
                 audit_log_uri: str, refresh: Callable[[], None] = lambda: None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._engine = engine
        self._policy = policy
        self._queue = queue
        self._recorder = recorder
        self._gateway_id = gateway_id
        self._backlog = backlog
        self._reader = reader
        self._audit_log_uri = audit_log_uri
        self._refresh = refresh
        self._clock = clock

    def window(self, *, since: datetime | None = None, until: datetime | None = None) -> DetectionWindow:
        return detection_window(now=self._clock(), settle=self._policy.settle,
                                initial_lookback=self._policy.initial_lookback, backlog=self._backlog.unshipped(),
                                since=since, until=until,
                                last_end=None if since is not None else self._queue.last_window_end())

    def run(self, *, since: datetime | None = None, until: datetime | None = None) -> DetectionRun:
        w = self.window(since=since, until=until)
        if w.held_back is not None:
            log.warning("audit detections held back at %s (asked for %s): %d audit event(s) wait to be shipped, "
                        "the oldest from %s; they are examined once shipped", _iso(w.end), _iso(w.requested_end),
                        w.held_back.pending, _iso(w.held_back.oldest))
        if w.empty:
            return DetectionRun(w.start, w.end, (), (), w.requested_end, w.held_back)
        self._refresh()
        try:
            findings = self._engine.detect(w.start, w.end)
        except Exception as exc:
            reason = exc.message if isinstance(exc, ComplianceError) else type(exc).__name__
            self._record_read(w, Outcome.SERIOUS_FAILURE, f"detection run failed: {reason}"[:1024])
            raise
        examined = dict(self._engine.examined)
        read = self._record_read(w, Outcome.SUCCESS, f"examined {sum(examined.values())} event(s) in "
                                                     f"{len(examined)} rule(s): {len(findings)} finding(s)")
        opened = [item for f in findings if (item := self._raise(f)) is not None]
        self._queue.record_run(w.start, w.end, len(opened))
        return DetectionRun(w.start, w.end, tuple(findings), tuple(opened), w.requested_end, w.held_back,
                            examined, read)

    def _record_read(self, w: DetectionWindow, outcome: Outcome, description: str) -> str:
        """One 110101 Audit Log Used per run, durable before any finding is raised (fail closed)."""
        query = {"command": "audit detect", "from": _iso(w.start), "to": _iso(w.end),
                 "rules": [name for name in RULES if self._policy.rule(name) is not None]}
        event = audit_log_used_event(
            user=self._reader, gateway_id=self._gateway_id, outcome=outcome, audit_log_uri=self._audit_log_uri,
            query=json.dumps(query, sort_keys=True, separators=(",", ":")).encode(),
            outcome_description=description, occurred_at=self._clock())
        self._recorder.record_now(event)
        return event.uuid

    def _raise(self, finding: Finding) -> int | None:
        if self._queue.known(finding.rule, finding.dedup_key):
            return None
        settings = self._policy.rules[finding.rule]
        user = None
        if finding.user_name or finding.user_id:
            user = UserRef(user_id=finding.user_id or finding.user_name or "", username=finding.user_name,
                           source_address=finding.source_address)
        event = security_alert_event(
            user=user,
            gateway_id=self._gateway_id,
            alert_type=settings.alert_type,
            description=finding.summary,
            resource=DETECTION_RESOURCE_PREFIX + finding.rule,
            outcome=settings.outcome,
            source_address=finding.source_address,
            patients=(PatientRef(finding.patient_id),) if finding.patient_id else (),
            occurred_at=self._clock(),
        )
        item = self._queue.add(rule=finding.rule, dedup_key=finding.dedup_key, alert_uuid=event.uuid,
                               user_name=finding.user_name, patient_id=finding.patient_id,
                               summary=finding.summary, evidence=finding.evidence)
        if item is None:
            return None
        try:
            self._recorder.record_now(event)
        except Exception:
            self._queue.withdraw(item)
            raise
        log.warning("audit detection %s: %s", finding.rule, finding.summary)
        return item


def findings_by_rule(findings: Sequence[Finding]) -> dict[str, list[Finding]]:
    out: dict[str, list[Finding]] = defaultdict(list)
    for f in findings:
        out[f.rule].append(f)
    return dict(out)
