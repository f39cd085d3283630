"""crypto: tombstones of crypto-shredded studies; joins the three branches into one head

Revision ID: 0008_erased_studies
Revises: 0004_audit_review, 0005_audit_checkpoints, 0007_export_delivery

The audit, crypto and export migrations grew as three branches off 0002 (upgrades used "heads").
This revision merges them, so from here the history is one line and ``alembic upgrade head`` and
``downgrade -1`` mean what they say.
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_erased_studies"
down_revision = ("0004_audit_review", "0005_audit_checkpoints", "0007_export_delivery")
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "crypto_erased_study",
        sa.Column("study_key", sa.String(64), nullable=False),
        sa.Column("patient_key", sa.String(64), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("study_key", name=op.f("pk_crypto_erased_study")),
    )
    op.create_index("ix_crypto_erased_study_patient_key", "crypto_erased_study", ["patient_key"])


def downgrade() -> None:
    op.drop_index("ix_crypto_erased_study_patient_key", table_name="crypto_erased_study")
    op.drop_table("crypto_erased_study")
