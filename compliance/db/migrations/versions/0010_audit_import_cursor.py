"""audit: the cursor of imports from external logs (Keycloak's login events)

Revision ID: 0010_audit_import_cursor
Revises: 0009_export_recovery
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_audit_import_cursor"
down_revision = "0009_export_recovery"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_import_cursor",
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("position", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("source", name=op.f("pk_audit_import_cursor")),
    )


def downgrade() -> None:
    op.drop_table("audit_import_cursor")
