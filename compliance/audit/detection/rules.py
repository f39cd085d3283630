"""The detection rules: :class:`DetectionEngine` reads a window of the audit trail and returns findings.

One method per rule of :data:`~compliance.audit.detection.policy.RULES` (see
:mod:`compliance.audit.detection` for what each finds). Nothing is truncated: the per-event rules page
through every event of the window and keep per group only a count, the first event and at most
:data:`MAX_EVIDENCE` evidence ids; the per-user rules page through every user.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from compliance.audit.codes import EventTypeCode
from compliance.audit.detection.policy import RULES, DetectionPolicy
from compliance.audit.documents import document_time, document_values
from compliance.audit.queries import AuditQueryService, AuditSearch
from compliance.audit.reports import DETECTION_RESOURCE_PREFIX
from compliance.auth.directory import UserDirectory

_NOT_A_DETECTION = {"bool": {"must_not": {"prefix": {"object.ids": DETECTION_RESOURCE_PREFIX}}}}
#: Evidence (event uuids) kept per finding; the finding's summary counts every event.
MAX_EVIDENCE = 50
#: Users per page of the per-user aggregations (composite: every user is seen, page by page).
USER_PAGE_SIZE = 500
#: Distinct claimed user names kept per failed-authentication burst (the summary names ten).
_MAX_CLAIMS = 1000
_FIELDS = ["@timestamp", "event.uuid", "event.id", "user.id", "user.name", "patient.ids", "patient.names",
           "source.address", "event.type_codes"]


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
            local = document_time(doc).astimezone(p.timezone)
            inside = local.weekday() in p.business_days and p.business_start <= local.time() < p.business_end
            if not inside:
                groups[(str(doc["user.name"]), local.date().isoformat())].add(doc, document_values(doc, "patient.ids"))
        out = []
        for (user, day), group in sorted(groups.items()):
            first = document_time(group.first).astimezone(p.timezone)
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
            ids = document_values(doc, "patient.ids")
            for name in document_values(doc, "patient.names"):
                if family_name(name).casefold() == mine:
                    patient = ids[0] if len(ids) == 1 else "?"
                    groups[(user, patient, self._local_day(document_time(doc)))].add(doc)
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
            for pid in document_values(doc, "patient.ids"):
                if pid in p.vip_patients:
                    groups[(user, pid, self._local_day(document_time(doc)))].add(doc)
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
            day = self._local_day(document_time(docs[0])) if docs else self._local_day(start)
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
            when, uuid = document_time(doc), str(doc["event.uuid"])
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


def findings_by_rule(findings: Sequence[Finding]) -> dict[str, list[Finding]]:
    out: dict[str, list[Finding]] = defaultdict(list)
    for f in findings:
        out[f.rule].append(f)
    return dict(out)
