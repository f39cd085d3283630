"""audit hash chain: per-event links and the chain head

Revision ID: 0003_audit_chain
Revises: 0002_crypto_keys
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_audit_chain"
down_revision = "0002_crypto_keys"
branch_labels = None
depends_on = None

GENESIS = "0" * 64


def upgrade() -> None:
    # Events recorded before the chain existed cannot be linked retroactively without rewriting
    # history; this migration refuses to run on a non-empty outbox rather than fake their links.
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT COUNT(*) FROM audit_outbox")).scalar_one():
        raise RuntimeError("audit_outbox is not empty: ship and archive it before enabling the hash chain")
    with op.batch_alter_table("audit_outbox") as batch:
        batch.add_column(sa.Column("prev_hash", sa.String(64), nullable=False))
        batch.add_column(sa.Column("hash", sa.String(64), nullable=False))
    head = op.create_table(
        "audit_chain_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_chain_head")),
    )
    op.bulk_insert(head, [{"id": 1, "seq": 0, "hash": GENESIS}])


def downgrade() -> None:
    op.drop_table("audit_chain_head")
    with op.batch_alter_table("audit_outbox") as batch:
        batch.drop_column("hash")
        batch.drop_column("prev_hash")
