"""crypto key metadata: KEKs and per-patient data keys

Revision ID: 0002_crypto_keys
Revises: 0001_audit_outbox
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_crypto_keys"
down_revision = "0001_audit_outbox"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "crypto_kek",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("destroyed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("state IN ('active', 'retired', 'destroyed')", name=op.f("ck_crypto_kek_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_crypto_kek")),
    )
    op.create_index("uq_crypto_kek_active", "crypto_kek", ["state"], unique=True,
                    sqlite_where=sa.text("state = 'active'"), postgresql_where=sa.text("state = 'active'"))
    op.create_table(
        "crypto_data_key",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("patient_key", sa.String(64), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=True),
        sa.Column("kek_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rewrapped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("destroyed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("(wrapped_key IS NULL) = (destroyed_at IS NOT NULL)",
                           name=op.f("ck_crypto_data_key_shredded_has_no_key")),
        sa.ForeignKeyConstraint(["kek_id"], ["crypto_kek.id"], name=op.f("fk_crypto_data_key_kek_id_crypto_kek")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_crypto_data_key")),
    )
    op.create_index("uq_crypto_data_key_live_patient", "crypto_data_key", ["patient_key"], unique=True,
                    sqlite_where=sa.text("destroyed_at IS NULL"), postgresql_where=sa.text("destroyed_at IS NULL"))
    op.create_index("ix_crypto_data_key_kek_id", "crypto_data_key", ["kek_id"])


def downgrade() -> None:
    op.drop_index("ix_crypto_data_key_kek_id", table_name="crypto_data_key")
    op.drop_index("uq_crypto_data_key_live_patient", table_name="crypto_data_key")
    op.drop_table("crypto_data_key")
    op.drop_index("uq_crypto_kek_active", table_name="crypto_kek")
    op.drop_table("crypto_kek")
