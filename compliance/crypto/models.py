"""Key metadata tables: key-encryption keys and the per-patient data keys they wrap.

``crypto_kek`` records each KEK's lifecycle (active -> retired -> destroyed); the key itself lives
only in the key provider. ``crypto_data_key`` holds one row per patient data key, the key wrapped
by ``kek_id``.

Patient identity is stored as ``patient_key`` = HMAC-SHA256(patient index key, patient id), hex,
never as the plain patient id: a patient id in the key table would be PHI in every database dump,
and an unkeyed hash would not help either, because medical record numbers are few and guessable
(a dump could be reversed by hashing every candidate). The index key is a secret held outside the
database (see :class:`compliance.crypto.keys.KeyService`).

Shredding sets ``wrapped_key`` to NULL and records ``destroyed_at``; the row stays as the record
that the patient's key existed and was destroyed. Backup caveat: database backups taken *before*
the shred still contain the wrapped key, and it unwraps for as long as the KEK that wrapped it
exists. Erasure is complete only once those backups expire, or once every data key has been
rewrapped under a new KEK and the old KEK destroyed (``rotate``, ``rewrap``, ``destroy_kek``), which
makes every older copy of every wrapped key useless.

``crypto_erased_study`` is the tombstone a shred leaves for each of the patient's studies: the
study's HMAC (same index key, its own domain) and the patient's, and when. After a shred the
patient's studies are removed from the archive's index (which held their names and ids in
plaintext), and this row is how a later retrieve of such a study still answers 410 Gone rather
than 404.

Migrations: these three tables are the crypto domain's whole schema.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, DateTime, ForeignKey, Index, LargeBinary, String, text
from sqlalchemy.orm import Mapped, mapped_column

from compliance.db.base import Base

KEK_STATES = ("active", "retired", "destroyed")


class CryptoKek(Base):
    __tablename__ = "crypto_kek"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    provider: Mapped[str] = mapped_column(String(32), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    destroyed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (
        CheckConstraint("state IN ('active', 'retired', 'destroyed')", name="state"),
        # At most one active KEK, enforced by the database even with several gateway processes.
        Index(
            "uq_crypto_kek_active",
            "state",
            unique=True,
            sqlite_where=text("state = 'active'"),
            postgresql_where=text("state = 'active'"),
        ),
    )


class CryptoDataKey(Base):
    __tablename__ = "crypto_data_key"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    #: HMAC-SHA256 of the patient id under the patient index key, hex (see module docstring).
    patient_key: Mapped[str] = mapped_column(String(64), nullable=False)
    #: The data key wrapped by ``kek_id``; NULL once shredded.
    wrapped_key: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    kek_id: Mapped[str] = mapped_column(ForeignKey("crypto_kek.id"), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    rewrapped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    destroyed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (
        CheckConstraint("(wrapped_key IS NULL) = (destroyed_at IS NOT NULL)", name="shredded_has_no_key"),
        # One live key per patient; after a shred, new data for the patient gets a new key.
        Index(
            "uq_crypto_data_key_live_patient",
            "patient_key",
            unique=True,
            sqlite_where=text("destroyed_at IS NULL"),
            postgresql_where=text("destroyed_at IS NULL"),
        ),
        Index("ix_crypto_data_key_kek_id", "kek_id"),
    )


class CryptoErasedStudy(Base):
    __tablename__ = "crypto_erased_study"

    #: HMAC-SHA256 of ``"study:" + StudyInstanceUID`` under the patient index key, hex.
    study_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: The erased patient's ``patient_key`` (see :class:`CryptoDataKey`).
    patient_key: Mapped[str] = mapped_column(String(64), nullable=False)
    erased_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)

    __table_args__ = (Index("ix_crypto_erased_study_patient_key", "patient_key"),)
