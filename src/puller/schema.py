"""The store's tables (SQLAlchemy 2.0 Core); no engine, no queries."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC in Python; `timestamptz` on PostgreSQL, fixed-width UTC text on SQLite.

    SQLite compares the text, so every value is stored in UTC in one format: the
    newest-wins comparison inside the upsert is then a correct string comparison.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; pass aware UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JsonDoc = JSON().with_variant(JSONB(), "postgresql")


TOMBSTONED = text("deleted_at IS NOT NULL")
"""The rows the retention purge reads (`puller purge`): the deleted_at indexes hold only
these, so storing a live record (nearly every record) writes no entry in them (0003)."""


def _tombstone_index(table: str) -> Index:
    return Index(f"ix_{table}_deleted_at", "deleted_at", sqlite_where=TOMBSTONED,
                 postgresql_where=TOMBSTONED)


def _record_columns() -> list[Column[Any]]:
    return [
        Column("last_modified_date", UtcDateTime(), nullable=False),
        Column("deleted_at", UtcDateTime()),
        Column("run_id", BigInteger, nullable=False, doc="the run that stored this version"),
        Column("stored_at", UtcDateTime(), nullable=False),
    ]


customers = Table(
    "customers",
    metadata,
    Column("tenant_id", String(64), primary_key=True),
    Column("customer_id", String(100), primary_key=True),
    Column("email", String(255), nullable=False),
    Column("first_name", String(100), nullable=False),
    Column("last_name", String(300), nullable=False),
    Column("mobile", String(20), nullable=False),
    Column("language", String(10), nullable=False),
    Column("consent", String(3), nullable=False),
    Column("gender", String(6), nullable=False),
    Column("extra", JsonDoc, nullable=False),
    *_record_columns(),
    _tombstone_index("customers"),
)

orders = Table(
    "orders",
    metadata,
    Column("tenant_id", String(64), primary_key=True),
    Column("order_id", String(100), primary_key=True),
    Column("customer_id", String(100), nullable=False),
    Column("payload", JsonDoc, nullable=False),
    *_record_columns(),
    _tombstone_index("orders"),
)

products = Table(
    "products",
    metadata,
    Column("tenant_id", String(64), primary_key=True),
    Column("product_id", String(100), primary_key=True),
    Column("payload", JsonDoc, nullable=False),
    *_record_columns(),
    _tombstone_index("products"),
)

rejected_records = Table(
    "rejected_records",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("tenant_id", String(64), nullable=False),
    Column("scope", String(16), nullable=False),
    Column("run_id", BigInteger, nullable=False),
    Column("page", String(200), nullable=False),
    Column("position", Integer, nullable=False),
    Column("record", JsonDoc, nullable=False),
    Column("reasons", JsonDoc, nullable=False),
    Column("rejected_at", UtcDateTime(), nullable=False),
    Index("ix_rejected_tenant_scope_run", "tenant_id", "scope", "run_id"),
    Index("ix_rejected_rejected_at", "rejected_at"),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("tenant_id", String(64), primary_key=True),
    Column("scope", String(16), primary_key=True),
    Column("next_number", Integer, nullable=False, doc="page count of the sweep, 1-based"),
    Column("next_page", Integer),
    Column("next_cursor", Text),
    Column("run_id", BigInteger, nullable=False, doc="the run that wrote this checkpoint"),
    Column("updated_at", UtcDateTime(), nullable=False),
)

runs = Table(
    "runs",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("tenant_id", String(64), nullable=False),
    Column("scope", String(16), nullable=False),
    Column("trigger", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("started_at", UtcDateTime(), nullable=False),
    Column("finished_at", UtcDateTime()),
    Column("pages", Integer, nullable=False, default=0),
    Column("accepted", Integer, nullable=False, default=0),
    Column("rejected", Integer, nullable=False, default=0),
    Column("stale", Integer, nullable=False, default=0),
    Column("normalised", Integer, nullable=False, default=0),
    Column("acks_failed", Integer, nullable=False, default=0),
    Column("error", Text),
    Column("worker", String(100), doc="host:pid of the process that ran it"),
    Index("ix_runs_tenant_scope_started", "tenant_id", "scope", "started_at"),
)

RECORD_TABLES = {"customer": customers, "order": orders, "product": products}
