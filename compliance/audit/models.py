"""The audit outbox table: every audit event is committed here before its request completes.

Rows are appended in ``seq`` order and shipped to the audit record repository (Elasticsearch)
asynchronously, at least once, with the event's UUID as the idempotent document id. A row is never
deleted by the shipper: ``shipped_at`` marks it delivered, so the outbox is also the local copy the
hash chain (issue: tamper evidence) is computed over.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from compliance.db.base import Base


class AuditOutboxRow(Base):
    __tablename__ = "audit_outbox"

    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    uuid: Mapped[str] = mapped_column(String(36), unique=True, nullable=False)
    event_code: Mapped[str] = mapped_column(String(16), nullable=False)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    #: The Elasticsearch document (flat fields plus the ATNA XML), as JSON text.
    document: Mapped[str] = mapped_column(Text, nullable=False)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    shipped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (Index("ix_audit_outbox_pending", "shipped_at", "seq"),)
