"""Tables of the export domain: requests, re-identification requests, the pseudonym map, project keys.

``export_request``: one research export, its state (``interfaces.STATES``), decision, progress
counters and the encrypted bundle it produced. The cohort's source identifiers needed later for the
accounting of disclosures (source patient IDs, study UIDs) are kept only sealed
(``disclosure_sealed``, AES-GCM under the project's map key), never in clear columns.

``export_pseudonym``: the pseudonym map. One row per (project, kind, pseudonym); the original value
is AES-256-GCM encrypted under the project's map key with the row's identity as associated data, so
a database dump reveals pseudonyms only (which the researchers hold anyway), never the originals.

``export_delivery_file``: per-file progress of a push to a DICOMweb research archive, written as each
batch leaves (``sending``) and as the destination answers (``stored``/``failed``/``unconfirmed``), so a
job that fails or is killed mid-push leaves the list of what was delivered, and a re-run skips what an
earlier attempt stored. Keyed by the pseudonymised SOP Instance UID (deterministic per project): no
source identifier.

``export_reidentification``: dual-control re-identification requests.

``export_project_key``: per-project secrets (pseudonym HMAC secret, map key, bundle key), each
wrapped by a KEK of the key provider (the KEK ids are those of ``crypto_kek``).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, DateTime, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from compliance.db.base import Base


class ExportRequest(Base):
    __tablename__ = "export_request"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    project: Mapped[str] = mapped_column(String(64), nullable=False)
    protocol: Mapped[str] = mapped_column(String(128), nullable=False)
    purpose: Mapped[str] = mapped_column(String(256), nullable=False)
    profile: Mapped[str] = mapped_column(String(64), nullable=False)
    #: JSON: {"study_uids": [...]} or {"filters": {...}} (QIDO-RS query parameters).
    cohort: Mapped[str] = mapped_column(Text, nullable=False)
    #: JSON: {"kind": "bundle"} or {"kind": "dicomweb", "name": <a destination of the allow-list>}.
    destination: Mapped[str] = mapped_column(Text, nullable=False)
    requester_id: Mapped[str] = mapped_column(String(128), nullable=False)
    requester_name: Mapped[str] = mapped_column(String(128), nullable=False)
    #: How the requester belonged to the registered project when asking ("group /research", "user rob":
    #: ``projects.Project.membership_of``); NULL for a request made before the project registry.
    requester_membership: Mapped[str | None] = mapped_column(String(200), nullable=True)
    approver_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    approver_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    decision_comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    total: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    processed: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    released: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    held_back: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    errors: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    bundle_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    bundle_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: sha256 of the (plaintext) zip the requester downloads, hex.
    checksum_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    disclosure_sealed: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    #: JSON, pushes to a DICOMweb destination only: per-file outcome (stored / failed / unconfirmed and
    #: why, or held back), counts, the destination. Pseudonymised UIDs only, never a source value.
    delivery: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: Claims so far (the fencing token of the running attempt: every job write is guarded by it).
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    #: While running: the job's worker renews this; past it, the sweep requeues (or fails) the request.
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: While approved: when the task queue accepted the request (NULL: not yet, the sweep dispatches it).
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (
        CheckConstraint("state IN ('requested', 'approved', 'rejected', 'running', 'ready', 'failed', 'expired')",
                        name="state"),
        CheckConstraint("approver_id IS NULL OR approver_id <> requester_id", name="not_self_approved"),
        Index("ix_export_request_state", "state"),
        Index("ix_export_request_requester_id", "requester_id"),
    )


DELIVERY_FILE_STATES = ("sending", "stored", "failed", "unconfirmed")


class ExportDeliveryFile(Base):
    __tablename__ = "export_delivery_file"

    request_id: Mapped[str] = mapped_column(String(36), ForeignKey("export_request.id", ondelete="CASCADE"),
                                            primary_key=True)
    #: the pseudonymised SOP Instance UID, as the destination knows it
    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: the instance's number in the job's plan (as in the delivery list)
    instance: Mapped[int] = mapped_column(Integer, nullable=False)
    batch: Mapped[int] = mapped_column(Integer, nullable=False)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)

    __table_args__ = (
        CheckConstraint("status IN ('sending', 'stored', 'failed', 'unconfirmed')", name="status"),
    )


class ExportReidentification(Base):
    __tablename__ = "export_reidentification"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    project: Mapped[str] = mapped_column(String(64), nullable=False)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    pseudonym: Mapped[str] = mapped_column(String(128), nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    requester_id: Mapped[str] = mapped_column(String(128), nullable=False)
    requester_name: Mapped[str] = mapped_column(String(128), nullable=False)
    approver_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    approver_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    decision_comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revealed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (
        CheckConstraint("state IN ('requested', 'approved', 'rejected', 'revealed')", name="state"),
        CheckConstraint("approver_id IS NULL OR approver_id <> requester_id", name="second_person"),
    )


class ExportPseudonym(Base):
    __tablename__ = "export_pseudonym"

    project: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    pseudonym: Mapped[str] = mapped_column(String(128), primary_key=True)
    #: nonce (12) || AES-256-GCM(map key, original, aad = project 0 kind 0 pseudonym)
    original_sealed: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class ExportProjectKey(Base):
    __tablename__ = "export_project_key"

    project: Mapped[str] = mapped_column(String(64), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(32), primary_key=True)
    kek_id: Mapped[str] = mapped_column(String(64), nullable=False)
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
