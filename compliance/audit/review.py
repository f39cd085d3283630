"""The review queue of detection findings (table ``audit_review_item``) and the detection watermark.

A finding (:class:`compliance.audit.detection.rules.Finding`) enters the queue as ``open`` together with
the uuid of the 110113 alert raised for it; a privacy officer acknowledges it (who, when, a note).
Items are never deleted: the queue is part of the evidence of the activity review
(45 CFR 164.308(a)(1)(ii)(D)).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, Row, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError as SqlIntegrityError

from compliance.audit.review_models import AuditDetectionRun, AuditReviewItem
from compliance.db.base import table_of
from compliance.errors import Conflict, InvalidRequest, NotFound

__all__ = ["ReviewItem", "ReviewStatus", "SqlReviewQueue"]

_ITEMS = table_of(AuditReviewItem)
_RUNS = table_of(AuditDetectionRun)

ReviewStatus = str
STATUSES = ("open", "acknowledged")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes for timezone-aware columns; they were stored as UTC.
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class ReviewItem:
    id: int
    rule: str
    dedup_key: str
    alert_uuid: str
    detected_at: datetime
    user_name: str | None
    patient_id: str | None
    summary: str
    evidence: tuple[str, ...]
    status: str
    acknowledged_by: str | None
    acknowledged_at: datetime | None
    note: str | None

    def to_json_obj(self) -> dict[str, object]:
        def iso(v: datetime | None) -> str | None:
            return None if v is None else v.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

        return {"id": self.id, "rule": self.rule, "alert_uuid": self.alert_uuid, "detected_at": iso(self.detected_at),
                "user": self.user_name, "patient": self.patient_id, "summary": self.summary,
                "evidence": list(self.evidence), "status": self.status, "acknowledged_by": self.acknowledged_by,
                "acknowledged_at": iso(self.acknowledged_at), "note": self.note}


def _item(row: Row[Any]) -> ReviewItem:
    r = row._mapping
    return ReviewItem(id=int(r["id"]), rule=r["rule"], dedup_key=r["dedup_key"], alert_uuid=r["alert_uuid"],
                      detected_at=_aware(r["detected_at"]), user_name=r["user_name"],  # type: ignore[arg-type]
                      patient_id=r["patient_id"], summary=r["summary"], evidence=tuple(json.loads(r["evidence"])),
                      status=r["status"], acknowledged_by=r["acknowledged_by"],
                      acknowledged_at=_aware(r["acknowledged_at"]), note=r["note"])


class SqlReviewQueue:
    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self._engine = engine
        self._clock = clock

    # -- detections -------------------------------------------------------------------------
    def add(self, *, rule: str, dedup_key: str, alert_uuid: str, user_name: str | None, patient_id: str | None,
            summary: str, evidence: Sequence[str]) -> int | None:
        """Queue a finding; None when the same ``(rule, dedup_key)`` is already queued."""
        try:
            with self._engine.begin() as conn:
                result = conn.execute(insert(_ITEMS).values(
                    rule=rule, dedup_key=dedup_key[:255], alert_uuid=alert_uuid, detected_at=self._clock(),
                    user_name=user_name, patient_id=patient_id, summary=summary,
                    evidence=json.dumps(list(evidence)), status="open"))
                return int(result.inserted_primary_key[0])  # type: ignore[index]
        except SqlIntegrityError:
            return None

    def known(self, rule: str, dedup_key: str) -> bool:
        with self._engine.connect() as conn:
            return conn.execute(select(_ITEMS.c.id).where(_ITEMS.c.rule == rule,
                                                          _ITEMS.c.dedup_key == dedup_key[:255])).first() is not None

    def withdraw(self, item_id: int) -> None:
        """Remove a just-added item whose alert could not be recorded (so a later run retries it)."""
        with self._engine.begin() as conn:
            conn.execute(delete(_ITEMS).where(_ITEMS.c.id == item_id, _ITEMS.c.status == "open"))

    def last_window_end(self) -> datetime | None:
        """The watermark: where the next run starts. A run's end is never past an unshipped event
        (:func:`compliance.audit.detection.window.detection_window`), so nothing before it is still to come."""
        with self._engine.connect() as conn:
            return _aware(conn.execute(select(func.max(_RUNS.c.window_end))).scalar())

    def record_run(self, window_start: datetime, window_end: datetime, findings: int) -> None:
        with self._engine.begin() as conn:
            conn.execute(insert(_RUNS).values(window_start=window_start, window_end=window_end,
                                              ran_at=self._clock(), findings=findings))

    # -- review -----------------------------------------------------------------------------
    def list(self, *, status: str | None = None, limit: int = 100, after_id: int | None = None) -> list[ReviewItem]:
        if status is not None and status not in STATUSES:
            raise InvalidRequest("status must be 'open' or 'acknowledged'")
        if not 1 <= limit <= 1000:
            raise InvalidRequest("limit must be between 1 and 1000")
        stmt = select(_ITEMS).order_by(_ITEMS.c.id).limit(limit)
        if status is not None:
            stmt = stmt.where(_ITEMS.c.status == status)
        if after_id is not None:
            stmt = stmt.where(_ITEMS.c.id > after_id)
        with self._engine.connect() as conn:
            return [_item(r) for r in conn.execute(stmt)]

    def get(self, item_id: int) -> ReviewItem:
        with self._engine.connect() as conn:
            row = conn.execute(select(_ITEMS).where(_ITEMS.c.id == item_id)).first()
        if row is None:
            raise NotFound(f"no review item {item_id}")
        return _item(row)

    def acknowledge(self, item_id: int, *, by: str, note: str | None = None) -> ReviewItem:
        with self._engine.begin() as conn:
            result = conn.execute(update(_ITEMS).where(_ITEMS.c.id == item_id, _ITEMS.c.status == "open").values(
                status="acknowledged", acknowledged_by=by, acknowledged_at=self._clock(), note=note))
            changed = result.rowcount
        if not changed:
            item = self.get(item_id)  # NotFound when it does not exist
            raise Conflict(f"review item {item_id} is already {item.status}")
        return self.get(item_id)
