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
* ``failed_auth_burst``: ``threshold`` refused authentications (110113 / 110143) from one source
  address within ``window_seconds``.

How it runs: :class:`DetectionJob` is a batch job, ``compliance audit detect``, meant for cron or a
systemd timer. It covers the events between the previous run's end (the watermark, table
``audit_detection_run``) and now minus ``settle_seconds`` (shipping to Elasticsearch is
asynchronous). It is not a task inside the gateway because the gateway runs one process per core:
a batch job runs once, however many workers there are. Every finding has a dedup key (rule + user
+ day, ...), unique in ``audit_review_item``, so overlapping or repeated runs never queue a finding
twice. Time comes from an injected clock; nothing sleeps.

Findings are recorded like any event: through :class:`~compliance.audit.recorder.AuditRecorder`
into the outbox (hash-chained, shipped at least once). Their subject is the resource
``urn:compliance:detection:<rule>``; the patient-facing reports leave those alerts out.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from compliance.audit.events import (
    Code,
    EventTypeCode,
    Outcome,
    PatientRef,
    UserRef,
    security_alert_event,
)
from compliance.audit.queries import AuditQueryService, AuditSearch
from compliance.audit.recorder import AuditRecorder
from compliance.audit.reports import DETECTION_RESOURCE_PREFIX
from compliance.audit.review import SqlReviewQueue
from compliance.config import PROJECT_ROOT
from compliance.errors import ConfigurationError, UpstreamUnavailable

__all__ = [
    "DETECTION_RESOURCE_PREFIX",
    "DetectionEngine",
    "DetectionJob",
    "DetectionPolicy",
    "DirectoryUser",
    "Finding",
    "KeycloakDirectory",
    "StaticDirectory",
    "UserDirectory",
]

log = logging.getLogger(__name__)

DEFAULT_POLICY_FILE = PROJECT_ROOT / "policies" / "detections.yaml"
RULES = ("after_hours", "volume_spike", "same_family_name", "vip_access", "disabled_account", "failed_auth_burst")
_NOT_A_DETECTION = {"bool": {"must_not": {"prefix": {"object.ids": DETECTION_RESOURCE_PREFIX}}}}
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
#: Events one rule reads per run at most (a run covers minutes to a day; far above that is a backlog).
MAX_EVENTS_PER_RULE = 200_000
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
        self._args: dict[str, Any] = dict(
            server_url=server_url.rstrip("/") + "/", client_id=client_id, client_secret_key=client_secret,
            realm_name=realm, user_realm_name=realm, timeout=20)
        self._ttl = ttl
        self._clock = clock
        self._cache: dict[str, tuple[datetime, DirectoryUser | None]] = {}
        self._admin: Any = None
        self._lock = threading.Lock()

    def _client(self) -> Any:
        if self._admin is None:
            from keycloak import KeycloakAdmin

            self._admin = KeycloakAdmin(**self._args)
        return self._admin

    def lookup(self, username: str) -> DirectoryUser | None:
        now = self._clock()
        with self._lock:
            cached = self._cache.get(username)
            if cached is not None and now - cached[0] < self._ttl:
                return cached[1]
        try:
            users = self._client().get_users({"username": username, "exact": True})
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


class DetectionEngine:
    def __init__(self, queries: AuditQueryService, policy: DetectionPolicy, directory: UserDirectory) -> None:
        self._queries = queries
        self._policy = policy
        self._directory = directory

    def detect(self, start: datetime, end: datetime) -> list[Finding]:
        findings: list[Finding] = []
        for name in RULES:
            if self._policy.rule(name) is not None:
                findings.extend(getattr(self, f"_{name}")(start, end))
        return findings

    # ------------------------------------------------------------------ helpers

    def _access_events(self, start: datetime, end: datetime, **filters: Any) -> Iterable[dict[str, Any]]:
        search = AuditSearch(event_types=(), start=start, end=end,
                             extra_filters=({"terms": {"event.id": list(self._policy.access_event_ids)}},
                                            {"exists": {"field": "user.name"}}),
                             **filters)
        return self._queries.iterate(search, source_fields=_FIELDS, limit=MAX_EVENTS_PER_RULE)

    def _local_day(self, moment: datetime) -> str:
        return moment.astimezone(self._policy.timezone).date().isoformat()

    # ------------------------------------------------------------------ rules

    def _after_hours(self, start: datetime, end: datetime) -> list[Finding]:
        p = self._policy
        groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for doc in self._access_events(start, end):
            local = _ts(doc).astimezone(p.timezone)
            inside = local.weekday() in p.business_days and p.business_start <= local.time() < p.business_end
            if not inside:
                groups[(str(doc["user.name"]), local.date().isoformat())].append(doc)
        out = []
        for (user, day), docs in sorted(groups.items()):
            first = _ts(docs[0]).astimezone(p.timezone)
            patients = {pid for d in docs for pid in _ids(d, "patient.ids")}
            out.append(Finding(
                rule="after_hours", dedup_key=f"{user}|{day}",
                summary=f"{user} accessed images outside business hours on {day}: {len(docs)} event(s), "
                        f"first at {first:%H:%M} ({p.timezone.key})",
                user_name=user, user_id=docs[0].get("user.id"),
                patient_id=next(iter(patients)) if len(patients) == 1 else None,
                source_address=docs[0].get("source.address"),
                evidence=tuple(str(d["event.uuid"]) for d in docs[:50])))
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
        aggs = {"users": {"terms": {"field": "user.name", "size": 10_000},
                          "aggs": {"days": {"date_histogram": {"field": "@timestamp", "calendar_interval": "1d",
                                                               "time_zone": tz.key, "min_doc_count": 1,
                                                               "format": "yyyy-MM-dd"}}}}}
        result = self._queries.aggregate(search, aggs)
        out = []
        judged_days: list[str] = []
        day = first_day
        while day < end.astimezone(tz):
            judged_days.append(day.date().isoformat())
            day += timedelta(days=1)
        for bucket in result.get("users", {}).get("buckets", []):
            user = str(bucket["key"])
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
        groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
        families: dict[str, str | None] = {}
        for doc in self._access_events(start, end):
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
                    groups[(user, patient, self._local_day(_ts(doc)))].append(doc)
                    break
        return [Finding(rule="same_family_name", dedup_key=f"{user}|{patient}|{day}",
                        summary=f"{user} accessed images of a patient with the same family name "
                                f"({'patient ' + patient if patient != '?' else 'in a multi-patient result'}) "
                                f"on {day}: {len(docs)} event(s)",
                        user_name=user, user_id=docs[0].get("user.id"),
                        patient_id=None if patient == "?" else patient,
                        source_address=docs[0].get("source.address"),
                        evidence=tuple(str(d["event.uuid"]) for d in docs[:50]))
                for (user, patient, day), docs in sorted(groups.items())]

    def _vip_access(self, start: datetime, end: datetime) -> list[Finding]:
        p = self._policy
        if not p.vip_patients:
            return []
        groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
        search = AuditSearch(patients=tuple(sorted(p.vip_patients)), start=start, end=end,
                             extra_filters=({"exists": {"field": "user.name"}}, _NOT_A_DETECTION))
        for doc in self._queries.iterate(search, source_fields=_FIELDS, limit=MAX_EVENTS_PER_RULE):
            user = str(doc["user.name"])
            if user in p.vip_exempt_users:
                continue
            for pid in _ids(doc, "patient.ids"):
                if pid in p.vip_patients:
                    groups[(user, pid, self._local_day(_ts(doc)))].append(doc)
        return [Finding(rule="vip_access", dedup_key=f"{user}|{pid}|{day}",
                        summary=f"{user} accessed restricted patient {pid} on {day}: {len(docs)} event(s)",
                        user_name=user, user_id=docs[0].get("user.id"), patient_id=pid,
                        source_address=docs[0].get("source.address"),
                        evidence=tuple(str(d["event.uuid"]) for d in docs[:50]))
                for (user, pid, day), docs in sorted(groups.items())]

    def _disabled_account(self, start: datetime, end: datetime) -> list[Finding]:
        search = AuditSearch(start=start, end=end, extra_filters=({"exists": {"field": "user.name"}},
                                                                   _NOT_A_DETECTION))
        aggs = {"users": {"terms": {"field": "user.name", "size": 10_000},
                          "aggs": {"sample": {"top_hits": {"size": 20, "sort": [{"@timestamp": "asc"}],
                                                           "_source": {"includes": _FIELDS}}}}}}
        result = self._queries.aggregate(search, aggs)
        out = []
        for bucket in result.get("users", {}).get("buckets", []):
            user = str(bucket["key"])
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
        rule = self._policy.rules["failed_auth_burst"]
        threshold = int(rule.options["threshold"])
        window = timedelta(seconds=int(rule.options["window_seconds"]))
        # Look back one window so a burst straddling two runs is still seen whole.
        search = AuditSearch(start=start - window, end=end, extra_filters=(
            {"term": {"event.id": "110113"}},
            {"term": {"event.type_codes": EventTypeCode.AUTHENTICATION_DECISION.code}}))
        by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for doc in self._queries.iterate(search, source_fields=[*_FIELDS, "user.unverified_claim"],
                                         limit=MAX_EVENTS_PER_RULE):
            by_source[str(doc.get("source.address") or "unknown")].append(doc)
        out = []
        for source, docs in sorted(by_source.items()):
            times = [_ts(d) for d in docs]
            i = 0
            lo = 0
            while i < len(docs):
                while times[i] - times[lo] > window:
                    lo += 1
                if i - lo + 1 >= threshold and times[i] >= start:
                    burst = docs[lo:i + 1]
                    # Extend over the rest of the burst so one burst is one finding.
                    j = i + 1
                    while j < len(docs) and times[j] - times[j - 1] <= window:
                        burst.append(docs[j])
                        j += 1
                    claims = sorted({str(d.get("user.unverified_claim")) for d in burst
                                     if d.get("user.unverified_claim")})
                    out.append(Finding(
                        rule="failed_auth_burst", dedup_key=f"{source}|{burst[0]['event.uuid']}",
                        summary=f"{len(burst)} refused authentications from {source} between "
                                f"{times[lo]:%Y-%m-%d %H:%M:%S} and {_ts(burst[-1]):%H:%M:%S} UTC"
                                + (f" (claimed users: {', '.join(claims[:10])})" if claims else ""),
                        source_address=None if source == "unknown" else source,
                        evidence=tuple(str(d["event.uuid"]) for d in burst[:50])))
                    i = j
                    lo = j
                    continue
                i += 1
        return out


# --------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class DetectionRun:
    window_start: datetime
    window_end: datetime
    findings: tuple[Finding, ...]
    #: Review item ids opened by this run (findings already queued are not repeated).
    opened: tuple[int, ...]

    def to_json_obj(self) -> dict[str, Any]:
        return {"from": self.window_start.isoformat(), "to": self.window_end.isoformat(),
                "findings": len(self.findings), "opened": list(self.opened),
                "rules": sorted({f.rule for f in self.findings})}


class DetectionJob:
    def __init__(self, engine: DetectionEngine, policy: DetectionPolicy, queue: SqlReviewQueue,
                 recorder: AuditRecorder, *, gateway_id: str,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._engine = engine
        self._policy = policy
        self._queue = queue
        self._recorder = recorder
        self._gateway_id = gateway_id
        self._clock = clock

    def run(self, *, since: datetime | None = None, until: datetime | None = None) -> DetectionRun:
        end = until or (self._clock() - self._policy.settle)
        start = since or self._queue.last_window_end() or (end - self._policy.initial_lookback)
        if start >= end:
            return DetectionRun(start, end, (), ())
        findings = self._engine.detect(start, end)
        opened = [item for f in findings if (item := self._raise(f)) is not None]
        self._queue.record_run(start, end, len(opened))
        return DetectionRun(start, end, tuple(findings), tuple(opened))

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
