"""exports: requests, re-identification requests, pseudonym map, project keys

Revision ID: 0006_exports
Revises: 0002_crypto_keys
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_exports"
down_revision = "0002_crypto_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "export_request",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("project", sa.String(64), nullable=False),
        sa.Column("protocol", sa.String(128), nullable=False),
        sa.Column("purpose", sa.String(256), nullable=False),
        sa.Column("profile", sa.String(64), nullable=False),
        sa.Column("cohort", sa.Text(), nullable=False),
        sa.Column("destination", sa.Text(), nullable=False),
        sa.Column("requester_id", sa.String(128), nullable=False),
        sa.Column("requester_name", sa.String(128), nullable=False),
        sa.Column("approver_id", sa.String(128), nullable=True),
        sa.Column("approver_name", sa.String(128), nullable=True),
        sa.Column("decision_comment", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("worker", sa.String(128), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("processed", sa.Integer(), nullable=False),
        sa.Column("released", sa.Integer(), nullable=False),
        sa.Column("held_back", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("bundle_path", sa.Text(), nullable=True),
        sa.Column("bundle_size", sa.Integer(), nullable=True),
        sa.Column("checksum_sha256", sa.String(64), nullable=True),
        sa.Column("disclosure_sealed", sa.LargeBinary(), nullable=True),
        sa.CheckConstraint(
            "state IN ('requested', 'approved', 'rejected', 'running', 'ready', 'failed', 'expired')",
            name=op.f("ck_export_request_state")),
        sa.CheckConstraint("approver_id IS NULL OR approver_id <> requester_id",
                           name=op.f("ck_export_request_not_self_approved")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_export_request")),
    )
    op.create_index("ix_export_request_state", "export_request", ["state"])
    op.create_index("ix_export_request_requester_id", "export_request", ["requester_id"])
    op.create_table(
        "export_reidentification",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("project", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("pseudonym", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("requester_id", sa.String(128), nullable=False),
        sa.Column("requester_name", sa.String(128), nullable=False),
        sa.Column("approver_id", sa.String(128), nullable=True),
        sa.Column("approver_name", sa.String(128), nullable=True),
        sa.Column("decision_comment", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revealed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("state IN ('requested', 'approved', 'rejected', 'revealed')",
                           name=op.f("ck_export_reidentification_state")),
        sa.CheckConstraint("approver_id IS NULL OR approver_id <> requester_id",
                           name=op.f("ck_export_reidentification_second_person")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_export_reidentification")),
    )
    op.create_table(
        "export_pseudonym",
        sa.Column("project", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("pseudonym", sa.String(128), nullable=False),
        sa.Column("original_sealed", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("project", "kind", "pseudonym", name=op.f("pk_export_pseudonym")),
    )
    op.create_table(
        "export_project_key",
        sa.Column("project", sa.String(64), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("kek_id", sa.String(64), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("project", "purpose", name=op.f("pk_export_project_key")),
    )


def downgrade() -> None:
    op.drop_table("export_project_key")
    op.drop_table("export_pseudonym")
    op.drop_table("export_reidentification")
    op.drop_index("ix_export_request_requester_id", table_name="export_request")
    op.drop_index("ix_export_request_state", table_name="export_request")
    op.drop_table("export_request")
