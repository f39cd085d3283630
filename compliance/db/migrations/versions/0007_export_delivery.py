"""exports: per-file delivery results of pushes to a DICOMweb research archive

Revision ID: 0007_export_delivery
Revises: 0006_exports
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_export_delivery"
down_revision = "0006_exports"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("export_request") as batch:
        batch.add_column(sa.Column("delivery", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("export_request") as batch:
        batch.drop_column("delivery")
