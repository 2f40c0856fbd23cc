"""sqlite_store: what `puller pull` writes a SQLite store with, without SQLAlchemy."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import make_url

from puller import errors, migration, schema, sqlite_store
from puller.domain import Checkpoint, Scope
from puller.sqlite_store import SqliteStore
from puller.store import Store, create_store_engine
from puller.tenant_server import TenantServer
from tests.acceptance.test_processes import write_many
from tests.conftest import add_dataset

NOW = datetime(2026, 11, 26, tzinfo=UTC)


@pytest.mark.parametrize("url", [
    "sqlite:///var/puller.db", "sqlite:////srv/puller/p.db", "sqlite+pysqlite:///p.db",
    "sqlite:///a%20b.db", "sqlite:////tmp/x y#1@2.db", "sqlite:///~/p.db",
])
def test_a_store_url_names_the_file_sqlalchemy_opens(url: str) -> None:
    assert sqlite_store.database_path(url) == make_url(url).database


@pytest.mark.parametrize("url", [
    "sqlite://", "sqlite:///:memory:", "sqlite:///p.db?timeout=5",
    "sqlite:///file:p.db?mode=ro&uri=true", "postgresql+psycopg://postgres@127.0.0.1/test",
])
def test_any_other_store_url_is_left_to_sqlalchemy(url: str) -> None:
    assert sqlite_store.database_path(url) is None


def test_a_fresh_store_gets_the_schema_that_schema_py_builds(tmp_path: Path) -> None:
    """SqliteStore creates a fresh file's schema from sqlite_schema.SCHEMA; Store from
    schema.py (migration.create_head): the same tables, indexes and revision, statement
    for statement. If this fails after a schema change, make the same change there."""
    SqliteStore.open(str(tmp_path / "raw.db")).close()
    Store.open(f"sqlite:///{tmp_path / 'orm.db'}").close()

    def master(name: str) -> list[tuple[str, str, str, str | None]]:
        db = sqlite3.connect(tmp_path / name)
        try:  # a table's indexes come in no set order from SQLAlchemy: sorted
            rows = db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
            return sorted([*rows, *db.execute("SELECT 'revision', version_num, '', NULL "
                                              "FROM alembic_version").fetchall()],
                          key=repr)
        finally:
            db.close()

    assert master("raw.db") == master("orm.db")
    engine = create_store_engine(f"sqlite:///{tmp_path / 'raw.db'}")
    try:
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), schema.metadata) == []
            assert migration.current(conn) == migration.HEAD
    finally:
        engine.dispose()


def test_a_store_of_another_revision_is_refused_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "behind.db"
    engine = create_store_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        migration.upgrade(conn, "0001")
    engine.dispose()
    with pytest.raises(errors.SchemaError, match="puller db upgrade"):
        SqliteStore.open(str(path))
    (tmp_path / "junk.db").write_bytes(b"not a database, " * 200)
    with pytest.raises(errors.StoreError, match="nothing of this step was written"):
        SqliteStore.open(str(tmp_path / "junk.db"))


def test_it_writes_what_store_reads(tmp_path: Path) -> None:
    """A run through SqliteStore, read back through Store (SQLAlchemy): the run's counters
    and times, its checkpoint, a failed acknowledgement, the last completed start."""
    path = tmp_path / "p.db"
    raw = SqliteStore.open(str(path))
    try:
        assert raw.load_checkpoint("t1", Scope.PRODUCT) == Checkpoint()
        with raw.lease("t1", Scope.PRODUCT) as held:
            assert held
            run_id = raw.start_run("t1", Scope.PRODUCT, trigger="manual", now=NOW)
            outcome = raw.apply_page(
                run_id=run_id, tenant="t1", scope=Scope.PRODUCT, page="1", accepted=[],
                rejections=[], checkpoint=Checkpoint(next_number=2, next_page=2),
                normalised=1, now=NOW)
            raw.count_failed_ack(run_id)
            stats = raw.finish_run(run_id, status="succeeded", now=NOW + timedelta(seconds=1),
                                   error="a\x00b")
        assert (outcome.applied, stats.pages, stats.normalised, stats.acks_failed) == (0, 1, 1, 1)
        assert raw.load_checkpoint("t1", Scope.PRODUCT) == Checkpoint(2, 2, None)
        assert raw.last_completed_start("t1", Scope.PRODUCT) == NOW
        assert raw.last_completed_start("t2", Scope.PRODUCT) is None
    finally:
        raw.close()
    store = Store.open(f"sqlite:///{path}")
    try:
        assert store.last_completed_start("t1", Scope.PRODUCT) == NOW
        assert store.load_checkpoint("t1", Scope.PRODUCT) == Checkpoint(2, 2, None)
        (run,) = store.list_runs(tenant="t1")
        assert (run["status"], run["started_at"], run["finished_at"], run["error"]) == (
            "succeeded", NOW, NOW + timedelta(seconds=1), "a\ufffdb")
    finally:
        store.close()


def test_the_lease_is_the_same_file_lock_as_stores(tmp_path: Path) -> None:
    """A run held by SqliteStore is busy for Store (another process's worker, say)."""
    path = tmp_path / "p.db"
    raw = SqliteStore.open(str(path))
    store = Store.open(f"sqlite:///{path}")
    try:
        with raw.lease("t1", Scope.CUSTOMER) as held, \
                store.lease("t1", Scope.CUSTOMER) as also:
            assert held and not also
    finally:
        store.close()
        raw.close()


def test_a_pull_into_sqlite_imports_no_sqlalchemy(
    tenant_server: TenantServer, tenant_id: str, tmp_path: Path,
) -> None:
    """In one process too: SQLAlchemy is imported only by commands that need it."""
    add_dataset(tenant_server, tenant_id, customers=12, products=0, orders=0)
    config = write_many(tmp_path, tenant_server, [tenant_id],
                        store_url=f"sqlite:///{tmp_path}/p.db")
    code = ("import atexit, sys; atexit.register(lambda: print('SQLALCHEMY', "
            "'sqlalchemy' in sys.modules)); from puller import cli; cli.main()")
    done = subprocess.run([sys.executable, "-c", code, "pull", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "SQLALCHEMY False" in done.stdout
    assert "succeeded" in done.stdout


@pytest.mark.parametrize("command", ["pull", "status"])
def test_a_store_whose_folder_cannot_be_made_is_a_clear_error(tmp_path: Path,
                                                              command: str) -> None:
    """A store path below a file: the command says so and what to do, without a traceback,
    whether it opens the store through sqlite_store (pull) or SQLAlchemy (status)."""
    (tmp_path / "a-file").write_text("")
    config = tmp_path / "c.yaml"
    config.write_text(f"store: sqlite:///{tmp_path}/a-file/sub/p.db\n"
                      "tenants:\n  - id: t1\n    shop: t1.example.com\n    callbacks:\n"
                      "      customer: {url: 'https://t1.example.com/customers'}\n")
    config.chmod(0o600)
    done = subprocess.run([sys.executable, "-m", "puller", command, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "NotADirectoryError" in done.stderr and "writable" in done.stderr
    assert "Traceback" not in done.stderr


def test_stores_opened_at_once_on_a_fresh_file_all_open(tmp_path: Path) -> None:
    """Several pulls starting together on a store not created yet: one creates the schema,
    the others find it (as Store does) instead of failing."""
    path = str(tmp_path / "fresh.db")
    start = threading.Barrier(6)

    def open_one(_: int) -> str:
        start.wait(5)
        store = SqliteStore.open(path)
        store.close()
        return "ok"

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(open_one, range(6))) == ["ok"] * 6
