"""audit signed checkpoints and per-sink delivery state

Revision ID: 0005_audit_checkpoints
Revises: 0003_audit_chain
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_audit_checkpoints"
down_revision = "0003_audit_chain"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_checkpoint",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("seq_from", sa.BigInteger(), nullable=False),
        sa.Column("seq_to", sa.BigInteger(), nullable=False),
        sa.Column("merkle_root", sa.String(64), nullable=False),
        sa.Column("head_hash", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("shipped_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_checkpoint")),
        sa.UniqueConstraint("seq_from", name=op.f("uq_audit_checkpoint_seq_from")),
    )
    op.create_table(
        "audit_outbox_delivery",
        sa.Column("sink", sa.String(32), nullable=False),
        sa.Column("uuid", sa.String(36), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sink", "uuid", name=op.f("pk_audit_outbox_delivery")),
    )


def downgrade() -> None:
    op.drop_table("audit_outbox_delivery")
    op.drop_table("audit_checkpoint")
