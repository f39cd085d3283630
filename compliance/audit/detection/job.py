"""One detection run (``compliance audit detect``): the window, the audited read, the alerts, the watermark."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from compliance.audit.codes import Outcome
from compliance.audit.detection.policy import RULES, DetectionPolicy
from compliance.audit.detection.rules import DetectionEngine, Finding
from compliance.audit.detection.window import Backlog, DetectionWindow, ShippingBacklog, detection_window
from compliance.audit.events import audit_log_used_event, security_alert_event
from compliance.audit.message import PatientRef, UserRef
from compliance.audit.recorder import AuditRecorder
from compliance.audit.reports import DETECTION_RESOURCE_PREFIX
from compliance.audit.review import SqlReviewQueue
from compliance.errors import ComplianceError

log = logging.getLogger(__name__)


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
        window = self.window(since=since, until=until)
        if window.held_back is not None:
            log.warning("audit detections held back at %s (asked for %s): %d audit event(s) wait to be shipped, "
                        "the oldest from %s; they are examined once shipped", _iso(window.end),
                        _iso(window.requested_end), window.held_back.pending, _iso(window.held_back.oldest))
        if window.empty:
            return DetectionRun(window.start, window.end, (), (), window.requested_end, window.held_back)
        self._refresh()
        try:
            findings = self._engine.detect(window.start, window.end)
        except Exception as exc:
            reason = exc.message if isinstance(exc, ComplianceError) else type(exc).__name__
            self._record_read(window, Outcome.SERIOUS_FAILURE, f"detection run failed: {reason}"[:1024])
            raise
        examined = dict(self._engine.examined)
        read = self._record_read(window, Outcome.SUCCESS, f"examined {sum(examined.values())} event(s) in "
                                                     f"{len(examined)} rule(s): {len(findings)} finding(s)")
        opened = [item for f in findings if (item := self._raise(f)) is not None]
        self._queue.record_run(window.start, window.end, len(opened))
        return DetectionRun(window.start, window.end, tuple(findings), tuple(opened), window.requested_end,
                            window.held_back, examined, read)

    def _record_read(self, window: DetectionWindow, outcome: Outcome, description: str) -> str:
        """One 110101 Audit Log Used per run, durable before any finding is raised (fail closed)."""
        query = {"command": "audit detect", "from": _iso(window.start), "to": _iso(window.end),
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
