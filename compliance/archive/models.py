"""The gateway's table of crypto-shred requests (two-person rule, :mod:`compliance.archive.shred`).

One row per request: the patient, who asked and why, and who decided (approved or rejected), when
and with what comment. The row lives in the gateway's database (beside the audit outbox), not in
the archive's key store: the custodian only ever sees the approved shred.

``second_person`` keeps the two-person rule in the schema as well: an approved or shredded request
has a decider who is not its requester (a rejection may come from the requester: a withdrawal).
``uq_archive_shred_request_open_patient``: at most one open request (requested or approved) per
patient, so two pending requests cannot be approved one by each administrator.

The PatientID is kept in plaintext, as the audit trail keeps it: the record of an erasure names
whom it erased.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, DateTime, Index, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from compliance.db.base import Base

SHRED_STATES = ("requested", "approved", "rejected", "shredded")


class ShredRequest(Base):
    __tablename__ = "archive_shred_request"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    #: The PatientID (0010,0020) whose data key the shred destroys.
    patient_id: Mapped[str] = mapped_column(String(64), nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    #: The requester's user id (the token's ``sub``, or ``os:<account>`` from the CLI) and name.
    requested_by: Mapped[str] = mapped_column(String(128), nullable=False)
    requested_by_name: Mapped[str] = mapped_column(String(128), nullable=False)
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    decided_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    decided_by_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: When the custodian confirmed the shred (the key destroyed and the patient gone from the index).
    executed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (
        CheckConstraint("state IN ('requested', 'approved', 'rejected', 'shredded')", name="state"),
        CheckConstraint("state NOT IN ('approved', 'shredded') OR "
                        "(decided_by IS NOT NULL AND decided_by <> requested_by)", name="second_person"),
        Index(
            "uq_archive_shred_request_open_patient",
            "patient_id",
            unique=True,
            sqlite_where=text("state IN ('requested', 'approved')"),
            postgresql_where=text("state IN ('requested', 'approved')"),
        ),
    )
