"""audit review queue: detection findings and detection runs

Revision ID: 0004_audit_review
Revises: 0002_crypto_keys
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_audit_review"
down_revision = "0002_crypto_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_review_item",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("rule", sa.String(64), nullable=False),
        sa.Column("dedup_key", sa.String(255), nullable=False),
        sa.Column("alert_uuid", sa.String(36), nullable=False),
        sa.Column("detected_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_name", sa.String(255), nullable=True),
        sa.Column("patient_id", sa.String(255), nullable=True),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("evidence", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("acknowledged_by", sa.String(255), nullable=True),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.CheckConstraint("status IN ('open', 'acknowledged')", name=op.f("ck_audit_review_item_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_review_item")),
        sa.UniqueConstraint("alert_uuid", name=op.f("uq_audit_review_item_alert_uuid")),
        sa.UniqueConstraint("rule", "dedup_key", name="uq_audit_review_item_rule_dedup_key"),
    )
    op.create_index("ix_audit_review_item_status", "audit_review_item", ["status", "id"])
    op.create_table(
        "audit_detection_run",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ran_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("findings", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_detection_run")),
    )


def downgrade() -> None:
    op.drop_table("audit_detection_run")
    op.drop_index("ix_audit_review_item_status", table_name="audit_review_item")
    op.drop_table("audit_review_item")
