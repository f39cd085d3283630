"""archive: crypto-shred requests (one administrator asks, a different one approves)

Revision ID: 0012_archive_shred_requests
Revises: 0011_export_project_membership
"""

import sqlalchemy as sa
from alembic import op

revision = "0012_archive_shred_requests"
down_revision = "0011_export_project_membership"
branch_labels = None
depends_on = None

_OPEN = "state IN ('requested', 'approved')"


def upgrade() -> None:
    op.create_table(
        "archive_shred_request",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("requested_by", sa.String(128), nullable=False),
        sa.Column("requested_by_name", sa.String(128), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_by", sa.String(128), nullable=True),
        sa.Column("decided_by_name", sa.String(128), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("executed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("state IN ('requested', 'approved', 'rejected', 'shredded')",
                           name=op.f("ck_archive_shred_request_state")),
        sa.CheckConstraint("state NOT IN ('approved', 'shredded') OR "
                           "(decided_by IS NOT NULL AND decided_by <> requested_by)",
                           name=op.f("ck_archive_shred_request_second_person")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_archive_shred_request")),
    )
    op.create_index("uq_archive_shred_request_open_patient", "archive_shred_request", ["patient_id"], unique=True,
                    sqlite_where=sa.text(_OPEN), postgresql_where=sa.text(_OPEN))


def downgrade() -> None:
    op.drop_index("uq_archive_shred_request_open_patient", table_name="archive_shred_request")
    op.drop_table("archive_shred_request")
