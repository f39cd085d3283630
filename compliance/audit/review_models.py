"""Tables of the anomaly review queue (``compliance/audit/review.py``, ``compliance/audit/detection/``).

``audit_review_item``: one row per detection hit, the 110113 alert it raised (``alert_uuid``), open until
a privacy officer acknowledges it. ``(rule, dedup_key)`` is unique, so running the detections twice over
the same events never queues the same finding twice.

``audit_detection_run``: one row per detection run and the window of events it covered; the next run
starts where the last one ended (the watermark), and a window never ends past an event still waiting
in the outbox to be shipped (``compliance/audit/detection/``).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, DateTime, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from compliance.db.base import Base


class AuditReviewItem(Base):
    __tablename__ = "audit_review_item"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rule: Mapped[str] = mapped_column(String(64), nullable=False)
    dedup_key: Mapped[str] = mapped_column(String(255), nullable=False)
    #: The uuid of the 110113 Security Alert event recorded for this finding.
    alert_uuid: Mapped[str] = mapped_column(String(36), nullable=False, unique=True)
    detected_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    user_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    patient_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    summary: Mapped[str] = mapped_column(Text, nullable=False)
    #: JSON list of the uuids of the audit events that triggered the finding.
    evidence: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="open")
    acknowledged_by: Mapped[str | None] = mapped_column(String(255), nullable=True)
    acknowledged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        UniqueConstraint("rule", "dedup_key", name="uq_audit_review_item_rule_dedup_key"),
        CheckConstraint("status IN ('open', 'acknowledged')", name="status"),
        Index("ix_audit_review_item_status", "status", "id"),
    )


class AuditDetectionRun(Base):
    __tablename__ = "audit_detection_run"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    window_start: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    window_end: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    ran_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    findings: Mapped[int] = mapped_column(Integer, nullable=False)
