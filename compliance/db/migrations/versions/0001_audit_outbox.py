"""audit outbox

Revision ID: 0001_audit_outbox
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_audit_outbox"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_outbox",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("uuid", sa.String(36), nullable=False),
        sa.Column("event_code", sa.String(16), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("shipped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_outbox")),
        sa.UniqueConstraint("uuid", name=op.f("uq_audit_outbox_uuid")),
    )
    op.create_index("ix_audit_outbox_pending", "audit_outbox", ["shipped_at", "seq"])


def downgrade() -> None:
    op.drop_index("ix_audit_outbox_pending", table_name="audit_outbox")
    op.drop_table("audit_outbox")
