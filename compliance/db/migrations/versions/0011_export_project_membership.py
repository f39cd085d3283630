"""exports: how the requester belonged to the registered project when the request was made

Revision ID: 0011_export_project_membership
Revises: 0010_audit_import_cursor
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_export_project_membership"
down_revision = "0010_audit_import_cursor"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # "group /research" or "user rob" (policies/projects.yaml); NULL for a request made before the
    # project registry, which a data steward can no longer approve (compliance/exports/projects.py).
    with op.batch_alter_table("export_request") as batch:
        batch.add_column(sa.Column("requester_membership", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("export_request") as batch:
        batch.drop_column("requester_membership")
