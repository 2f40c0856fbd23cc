"""runs.worker (which process ran it) and indexes for the retention purge

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 13:15:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_PURGED = {"customers": "ix_customers_deleted_at", "orders": "ix_orders_deleted_at",
           "products": "ix_products_deleted_at"}


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("worker", sa.String(length=100), nullable=True))
    for table, index in _PURGED.items():
        op.create_index(index, table, ["deleted_at"])
    op.create_index("ix_rejected_rejected_at", "rejected_records", ["rejected_at"])


def downgrade() -> None:
    op.drop_index("ix_rejected_rejected_at", table_name="rejected_records")
    for table, index in _PURGED.items():
        op.drop_index(index, table_name=table)
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("worker")
