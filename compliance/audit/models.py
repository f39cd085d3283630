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
    #: The hash chain (compliance/audit/chain.py); also inside ``document`` as chain.prev / chain.hash.
    prev_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    hash: Mapped[str] = mapped_column(String(64), nullable=False)

    __table_args__ = (Index("ix_audit_outbox_pending", "shipped_at", "seq"),)


class AuditChainHead(Base):
    """One row (id 1): the last chain position and hash. Locked by every append transaction."""

    __tablename__ = "audit_chain_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    hash: Mapped[str] = mapped_column(String(64), nullable=False)


class AuditCheckpoint(Base):
    """A signed checkpoint: Ed25519 over the RFC 6962 Merkle root of events seq_from..seq_to.

    ``seq_from`` is unique, so two gateway processes that race to sign the same range cannot both
    succeed (compliance/audit/checkpoints.py); ``shipped_at`` marks it delivered to the repository.
    """

    __tablename__ = "audit_checkpoint"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    seq_from: Mapped[int] = mapped_column(BigInteger, unique=True, nullable=False)
    seq_to: Mapped[int] = mapped_column(BigInteger, nullable=False)
    merkle_root: Mapped[str] = mapped_column(String(64), nullable=False)
    head_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    key_id: Mapped[str] = mapped_column(String(64), nullable=False)
    signature: Mapped[str] = mapped_column(String(128), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    shipped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AuditOutboxDelivery(Base):
    """Which sink already holds which event, when several sinks are configured (fan-out)."""

    __tablename__ = "audit_outbox_delivery"

    sink: Mapped[str] = mapped_column(String(32), primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    delivered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class AuditImportCursor(Base):
    """Where the last import of an external log into the outbox ended, per source (e.g. one Keycloak
    realm's login events, compliance/audit/logins.py): the time of the newest event imported."""

    __tablename__ = "audit_import_cursor"

    source: Mapped[str] = mapped_column(String(255), primary_key=True)
    position: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
