"""exports: job recovery (attempts, lease, dispatch) and per-file delivery of pushes

Revision ID: 0009_export_recovery
Revises: 0008_erased_studies
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_export_recovery"
down_revision = "0008_erased_studies"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("export_request") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
    # A request running when this migration runs was claimed once; it has no lease (the sweep expires
    # such a row a while after it started, see compliance/exports/recovery.py).
    op.execute("UPDATE export_request SET attempts = 1 WHERE started_at IS NOT NULL")
    op.create_table(
        "export_delivery_file",
        sa.Column("request_id", sa.String(36), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("instance", sa.Integer(), nullable=False),
        sa.Column("batch", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('sending', 'stored', 'failed', 'unconfirmed')",
                           name=op.f("ck_export_delivery_file_status")),
        sa.ForeignKeyConstraint(["request_id"], ["export_request.id"], ondelete="CASCADE",
                                name=op.f("fk_export_delivery_file_request_id_export_request")),
        sa.PrimaryKeyConstraint("request_id", "sop_instance_uid", name=op.f("pk_export_delivery_file")),
    )


def downgrade() -> None:
    op.drop_table("export_delivery_file")
    with op.batch_alter_table("export_request") as batch:
        batch.drop_column("dispatched_at")
        batch.drop_column("lease_expires_at")
        batch.drop_column("attempts")
