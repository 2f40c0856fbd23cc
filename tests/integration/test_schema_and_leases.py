"""Migrations and leases on both backends."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from puller import cli, errors, migration, pulls, schema
from puller.domain import Scope
from puller.store import Store, create_store_engine
from puller.tenant_server import TenantServer
from tests.conftest import BACKENDS, add_dataset, config_for

NOW = datetime(2026, 11, 25, tzinfo=UTC)


@BACKENDS
def test_a_fresh_store_is_created_at_head_and_matches_schema_py(store: Store) -> None:
    """An empty database is brought to head on open; its schema equals schema.py."""
    current, needed = store.schema_revision()
    assert current == needed == migration.head()
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), schema.metadata) == []


@BACKENDS
def test_the_migration_scripts_build_what_a_fresh_store_gets(store_url: str,
                                                             second_store_url: str) -> None:
    """A fresh store is created from schema.py (migration.create_head); running every
    migration script on an empty database must build the very same schema: tables,
    columns, keys, indexes with their WHERE clauses, and the revision."""
    engine = create_store_engine(store_url)
    with engine.begin() as conn:
        migration.upgrade(conn)
    engine.dispose()
    Store.open(second_store_url).close()  # migration.create_head
    assert _schema_of(store_url) == _schema_of(second_store_url)


def _schema_of(url: str) -> dict[str, Any]:
    """Every table's columns, keys and indexes, and the revision, as the database says."""
    engine = create_store_engine(url)
    try:
        with engine.connect() as conn:
            look = sa.inspect(conn)
            found: dict[str, Any] = {}
            for table in sorted(look.get_table_names()):
                found[table] = {
                    "columns": [(c["name"], str(c["type"]), c["nullable"], c.get("default"))
                                for c in look.get_columns(table)],
                    "primary key": look.get_pk_constraint(table)["constrained_columns"],
                    "unique": sorted(str(u) for u in look.get_unique_constraints(table)),
                    "indexes": sorted((i["name"], tuple(i["column_names"]), i["unique"],
                                       _index_where(conn, i["name"]))
                                      for i in look.get_indexes(table)),
                }
            found["revision"] = migration.current(conn)
            return found
    finally:
        engine.dispose()


def _index_where(conn: sa.Connection, name: str | None) -> str:
    sql = ("SELECT indexdef FROM pg_indexes WHERE indexname = :n"
           if conn.dialect.name == "postgresql" else
           "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = :n")
    definition = str(conn.execute(sa.text(sql), {"n": name}).scalar_one())
    return definition.partition(" WHERE ")[2]


@BACKENDS
def test_a_store_behind_is_refused_until_db_upgrade(store_url: str) -> None:
    """A database at an older revision is refused with what to do; upgrade keeps the data."""
    engine = create_store_engine(store_url)
    with engine.begin() as conn:
        migration.upgrade(conn, "0001")
        conn.execute(sa.text("INSERT INTO checkpoints (tenant_id, scope, next_number, run_id, "
                             "updated_at) VALUES ('acme', 'order', 4, 1, :now)"),
                     {"now": NOW.replace(tzinfo=None)})
    engine.dispose()
    needs = rf"at revision 0001, this puller needs {migration.head()} .* "
    with pytest.raises(errors.SchemaError, match=needs + r"run `puller db upgrade --config PATH`"):
        Store.open(store_url)
    store = Store.open(store_url, check_schema=False)
    try:
        assert store.upgrade_schema() == migration.head()
    finally:
        store.close()
    store = Store.open(store_url)
    try:
        assert store.load_checkpoint("acme", Scope.ORDER).next_number == 4
    finally:
        store.close()


@BACKENDS
def test_deleted_at_indexes_hold_only_tombstones_and_serve_the_purge(store_url: str) -> None:
    """0003: after 0002 -> head, each record table's deleted_at index is partial (a live
    record writes no entry in it) and the purge's query still searches it. A fresh store
    gets the same indexes (test_the_migration_scripts_build_what_a_fresh_store_gets)."""
    engine = create_store_engine(store_url)
    with engine.begin() as conn:
        migration.upgrade(conn, "0002")
    engine.dispose()
    store = Store.open(store_url, check_schema=False)
    try:
        store.upgrade_schema()
        with store.engine.connect() as conn:
            postgres = conn.dialect.name == "postgresql"
            for table in schema.RECORD_TABLES.values():
                name = f"ix_{table.name}_deleted_at"
                definition = conn.execute(sa.text(
                    "SELECT indexdef FROM pg_indexes WHERE indexname = :n" if postgres
                    else "SELECT sql FROM sqlite_master WHERE name = :n"), {"n": name}).scalar_one()
                assert "WHERE (deleted_at IS NOT NULL)" in definition if postgres else (
                    definition.endswith("WHERE deleted_at IS NOT NULL")), definition
                purge = sa.delete(table).where(table.c.deleted_at.is_not(None),
                                               table.c.deleted_at < NOW)
                sql = str(purge.compile(conn, compile_kwargs={"literal_binds": True}))
                if postgres:
                    conn.execute(sa.text("SET enable_seqscan = off"))
                plan = " ".join(str(row) for row in conn.execute(sa.text(
                    f"EXPLAIN {sql}" if postgres else f"EXPLAIN QUERY PLAN {sql}")))
                assert name in plan, plan
    finally:
        store.close()


@BACKENDS
def test_tables_without_a_revision_are_refused(store_url: str) -> None:
    """Tables puller did not create (no revision) are not silently adopted."""
    engine = create_store_engine(store_url)
    with engine.begin() as conn:
        schema.metadata.create_all(conn)
    engine.dispose()
    with pytest.raises(errors.SchemaError, match="no schema revision"):
        Store.open(store_url)


@BACKENDS
def test_a_lease_is_held_once(store: Store) -> None:
    """One holder per (tenant, scope); other pairs are free; released on exit."""
    with store.lease("acme", Scope.ORDER) as first:
        assert first
        with store.lease("acme", Scope.ORDER) as second:
            assert not second
        with store.lease("acme", Scope.CUSTOMER) as other:
            assert other
    with store.lease("acme", Scope.ORDER) as again:
        assert again


HOLDER = """
import sys, time
from puller.store import Store
from puller.domain import Scope
store = Store.open(sys.argv[1])
with store.lease("acme", Scope.ORDER) as held:
    print("held" if held else "busy", flush=True)
    time.sleep(60)
"""


@BACKENDS
def test_a_lease_dies_with_a_killed_process(store: Store, store_url: str) -> None:
    """kill -9 of the holder frees the lease at once: a crashed worker blocks nothing."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, store_url],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with store.lease("acme", Scope.ORDER) as held:
            assert not held
    finally:
        holder.kill()
        holder.wait(timeout=10)
        if holder.stdout is not None:
            holder.stdout.close()
    deadline = time.monotonic() + 10
    while True:
        with store.lease("acme", Scope.ORDER) as held:
            if held:
                break
        assert time.monotonic() < deadline, "the lease outlived its process"
        time.sleep(0.1)


@BACKENDS
async def test_a_pull_skips_a_scope_leased_elsewhere(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """While another process holds the lease, a pull does not run: no request, no run row."""
    add_dataset(tenant_server, tenant_id, customers=5)
    config = config_for(tenant_server, tenant_id, store=store_url, scopes={"customer": {}})
    jobs = cli.select_jobs(config, [], [], trigger="test")
    with store.lease(tenant_id, Scope.CUSTOMER) as held:
        assert held
        (result,) = await pulls.pull_now(config, jobs, store, concurrency=1)
    assert result.status == "skipped" and result.error is not None
    assert "another process is pulling" in result.error
    assert store.list_runs(tenant=tenant_id) == []
    assert [p for p, _, _ in tenant_server.requests if p.startswith(f"/{tenant_id}/")] == []
    (after,) = await pulls.pull_now(config, jobs, store, concurrency=1)
    assert after.status == "succeeded"


def test_head_constant_is_the_newest_migration_script() -> None:
    """migration.HEAD (checked at start-up without Alembic) names the newest script."""
    assert migration.script_head() == migration.HEAD
