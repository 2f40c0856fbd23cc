"""A fresh SQLite store's schema without SQLAlchemy, for `puller pull` (sqlite_store):
the tables at SCHEMA_HEAD as the text SQLAlchemy emits for schema.py, and the check that
a store is at that revision."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager

from puller import errors

SCHEMA_HEAD = "0003"
"""The schema revision this code needs (migration.HEAD; a test checks it is the newest
script in migrations/)."""

SCHEMA = (
    'CREATE TABLE customers (\n\ttenant_id VARCHAR(64) NOT NULL, \n\tcustomer_id '
    'VARCHAR(100) NOT NULL, \n\temail VARCHAR(255) NOT NULL, \n\tfirst_name VARCHAR(100) '
    'NOT NULL, \n\tlast_name VARCHAR(300) NOT NULL, \n\tmobile VARCHAR(20) NOT NULL, '
    '\n\tlanguage VARCHAR(10) NOT NULL, \n\tconsent VARCHAR(3) NOT NULL, \n\tgender '
    'VARCHAR(6) NOT NULL, \n\textra JSON NOT NULL, \n\tlast_modified_date DATETIME NOT '
    'NULL, \n\tdeleted_at DATETIME, \n\trun_id BIGINT NOT NULL, \n\tstored_at DATETIME NOT '
    'NULL, \n\tPRIMARY KEY (tenant_id, customer_id)\n)',
    'CREATE INDEX ix_customers_deleted_at ON customers (deleted_at) WHERE deleted_at IS '
    'NOT NULL',
    'CREATE TABLE orders (\n\ttenant_id VARCHAR(64) NOT NULL, \n\torder_id VARCHAR(100) '
    'NOT NULL, \n\tcustomer_id VARCHAR(100) NOT NULL, \n\tpayload JSON NOT NULL, '
    '\n\tlast_modified_date DATETIME NOT NULL, \n\tdeleted_at DATETIME, \n\trun_id BIGINT '
    'NOT NULL, \n\tstored_at DATETIME NOT NULL, \n\tPRIMARY KEY (tenant_id, order_id)\n)',
    'CREATE INDEX ix_orders_deleted_at ON orders (deleted_at) WHERE deleted_at IS NOT NULL',
    'CREATE TABLE products (\n\ttenant_id VARCHAR(64) NOT NULL, \n\tproduct_id '
    'VARCHAR(100) NOT NULL, \n\tpayload JSON NOT NULL, \n\tlast_modified_date DATETIME NOT '
    'NULL, \n\tdeleted_at DATETIME, \n\trun_id BIGINT NOT NULL, \n\tstored_at DATETIME NOT '
    'NULL, \n\tPRIMARY KEY (tenant_id, product_id)\n)',
    'CREATE INDEX ix_products_deleted_at ON products (deleted_at) WHERE deleted_at IS NOT '
    'NULL',
    'CREATE TABLE rejected_records (\n\tid INTEGER NOT NULL, \n\ttenant_id VARCHAR(64) NOT '
    'NULL, \n\tscope VARCHAR(16) NOT NULL, \n\trun_id BIGINT NOT NULL, \n\tpage '
    'VARCHAR(200) NOT NULL, \n\tposition INTEGER NOT NULL, \n\trecord JSON NOT NULL, '
    '\n\treasons JSON NOT NULL, \n\trejected_at DATETIME NOT NULL, \n\tPRIMARY KEY (id)\n)',
    'CREATE INDEX ix_rejected_tenant_scope_run ON rejected_records (tenant_id, scope, '
    'run_id)',
    'CREATE INDEX ix_rejected_rejected_at ON rejected_records (rejected_at)',
    'CREATE TABLE checkpoints (\n\ttenant_id VARCHAR(64) NOT NULL, \n\tscope VARCHAR(16) '
    'NOT NULL, \n\tnext_number INTEGER NOT NULL, \n\tnext_page INTEGER, \n\tnext_cursor '
    'TEXT, \n\trun_id BIGINT NOT NULL, \n\tupdated_at DATETIME NOT NULL, \n\tPRIMARY KEY '
    '(tenant_id, scope)\n)',
    'CREATE TABLE runs (\n\tid INTEGER NOT NULL, \n\ttenant_id VARCHAR(64) NOT NULL, '
    '\n\tscope VARCHAR(16) NOT NULL, \n\t"trigger" VARCHAR(16) NOT NULL, \n\tstatus '
    'VARCHAR(16) NOT NULL, \n\tstarted_at DATETIME NOT NULL, \n\tfinished_at DATETIME, '
    '\n\tpages INTEGER NOT NULL, \n\taccepted INTEGER NOT NULL, \n\trejected INTEGER NOT '
    'NULL, \n\tstale INTEGER NOT NULL, \n\tnormalised INTEGER NOT NULL, \n\tacks_failed '
    'INTEGER NOT NULL, \n\terror TEXT, \n\tworker VARCHAR(100), \n\tPRIMARY KEY (id)\n)',
    'CREATE INDEX ix_runs_tenant_scope_started ON runs (tenant_id, scope, started_at)',
    'CREATE TABLE alembic_version (\n\tversion_num VARCHAR(32) NOT NULL, \n\tCONSTRAINT '
    'alembic_version_pkc PRIMARY KEY (version_num)\n)',
)
"""A fresh store's schema at SCHEMA_HEAD, as migration.create_head builds it from
schema.py on SQLite (the text SQLAlchemy emits; a test checks that both build the same
sqlite_master, so a schema change that is not made here too fails it)."""


def ensure_schema(transaction: Callable[[], AbstractContextManager[sqlite3.Connection]]
                  ) -> None:
    """Create a fresh database's schema at head; refuse one whose revision is not head
    (as store.Store.ensure_schema does). `transaction`: an IMMEDIATE one on the store's
    writer connection (sqlite_store.SqliteWriter.transaction)."""
    try:
        # IMMEDIATE: pulls starting together on a fresh file take turns (busy_timeout); the
        # first creates the schema, the others find it.
        with transaction() as db:
            current = _revision(db)
            if current is None and not _has_table(db, "runs"):
                for ddl in SCHEMA:
                    db.execute(ddl)
                db.execute("INSERT INTO alembic_version (version_num) VALUES (?)",
                           (SCHEMA_HEAD,))
                return
    except errors.StoreError:
        # Another process created the schema at the same moment; look again.
        with transaction() as db:
            current = _revision(db)
    if current != SCHEMA_HEAD:
        raise errors.SchemaError(current=current, needed=SCHEMA_HEAD)


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                      (name,)).fetchone() is not None


def _revision(db: sqlite3.Connection) -> str | None:
    if not _has_table(db, "alembic_version"):
        return None
    row = db.execute("SELECT version_num FROM alembic_version").fetchone()
    return None if row is None else str(row[0])
