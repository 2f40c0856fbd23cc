"""pg_store: what `puller pull` writes a PostgreSQL store with, without SQLAlchemy."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import make_url

from puller import errors, migration, pg_store, schema
from puller.domain import Accepted, Checkpoint, Scope
from puller.pg_store import PgStore
from puller.store import Store, create_store_engine
from tests.integration.test_schema_and_leases import _schema_of

POSTGRES = pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
NOW = datetime(2026, 11, 26, tzinfo=UTC)


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "postgresql://puller:s%40cr%2Ft@db.example.com:6543/pull%20er",
    "postgresql+psycopg://puller@db.example.com/puller",
])
def test_a_store_url_names_what_sqlalchemy_connects_to(url: str) -> None:
    info = pg_store.conninfo(url)
    assert info is not None
    got, want = conninfo_to_dict(info), make_url(url)
    assert (got.get("user"), got.get("password"), got.get("host"), got.get("dbname")) == (
        want.username, want.password, want.host, want.database)
    assert int(got.get("port") or 5432) == (want.port or 5432)


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://postgres@127.0.0.1/test?sslmode=require",
    "postgresql+psycopg2://postgres@127.0.0.1/test", "sqlite:///p.db",
])
def test_any_other_store_url_is_left_to_sqlalchemy(url: str) -> None:
    assert pg_store.conninfo(url) is None


def _info(url: str) -> str:
    info = pg_store.conninfo(url)
    assert info is not None
    return info


@POSTGRES
def test_a_fresh_database_gets_the_schema_that_schema_py_builds(
    store_url: str, second_store_url: str,
) -> None:
    """PgStore creates a fresh database's schema from pg_store.SCHEMA; Store from schema.py
    (migration.create_head): the same tables, columns, keys, indexes and revision. If this
    fails after a schema change, make the same change there."""
    PgStore.open(_info(store_url)).close()
    Store.open(second_store_url).close()
    assert _schema_of(store_url) == _schema_of(second_store_url)
    engine = create_store_engine(store_url)
    try:
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), schema.metadata) == []
    finally:
        engine.dispose()


@POSTGRES
def test_a_database_of_another_revision_is_refused_with_what_to_do(store_url: str) -> None:
    engine = create_store_engine(store_url)
    with engine.begin() as conn:
        migration.upgrade(conn, "0001")
    engine.dispose()
    with pytest.raises(errors.SchemaError, match="puller db upgrade"):
        PgStore.open(_info(store_url))


@POSTGRES
def test_pulls_opening_a_fresh_database_at_once_all_open(store_url: str) -> None:
    start = threading.Barrier(4)

    def open_one(_: int) -> str:
        start.wait(10)
        PgStore.open(_info(store_url)).close()
        return "ok"

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(open_one, range(4))) == ["ok"] * 4


@POSTGRES
def test_it_writes_what_store_reads_and_shares_its_leases(store_url: str) -> None:
    """A run through PgStore, read back through Store (SQLAlchemy): counters, times, the
    checkpoint, a failed acknowledgement, the last completed start; while PgStore holds a
    run's lease, Store cannot take it."""
    raw = PgStore.open(_info(store_url))
    store = Store.open(store_url)
    try:
        assert raw.load_checkpoint("t1", Scope.PRODUCT) == Checkpoint()
        with raw.lease("t1", Scope.PRODUCT) as held:
            assert held
            with store.lease("t1", Scope.PRODUCT) as also:
                assert not also
            run_id = raw.start_run("t1", Scope.PRODUCT, trigger="manual", now=NOW)
            outcome = raw.apply_page(
                run_id=run_id, tenant="t1", scope=Scope.PRODUCT, page="1", accepted=[],
                rejections=[], checkpoint=Checkpoint(next_number=2, next_page=2),
                normalised=1, now=NOW)
            raw.count_failed_ack(run_id)
            stats = raw.finish_run(run_id, status="succeeded", now=NOW + timedelta(seconds=1),
                                   error="a\x00b")
        with store.lease("t1", Scope.PRODUCT) as free_again:
            assert free_again
        assert (outcome.applied, stats.pages, stats.normalised, stats.acks_failed) == (0, 1, 1, 1)
        assert raw.load_checkpoint("t1", Scope.PRODUCT) == Checkpoint(2, 2, None)
        assert raw.last_completed_start("t1", Scope.PRODUCT) == NOW
        assert store.last_completed_start("t1", Scope.PRODUCT) == NOW
        (run,) = store.list_runs(tenant="t1")
        assert (run["status"], run["started_at"], run["finished_at"], run["error"]) == (
            "succeeded", NOW, NOW + timedelta(seconds=1), "a\ufffdb")
        second = raw.start_run("t1", Scope.PRODUCT, trigger="manual", now=NOW)
        third = raw.start_run("t1", Scope.PRODUCT, trigger="manual", now=NOW)
        statuses = {r["id"]: r["status"] for r in store.list_runs(tenant="t1")}
        assert (statuses[second], statuses[third]) == ("abandoned", "running")
    finally:
        store.close()
        raw.close()


def _product(number: int, minutes: int) -> Accepted:
    return Accepted(f"p{number}", NOW + timedelta(minutes=minutes), None,
                    {"payload": {"version": minutes}}, number)


@POSTGRES
def test_a_first_load_inserts_until_a_record_comes_again_then_upserts(store_url: str) -> None:
    """A run that starts with none of the tenant's records stored writes its pages by plain
    INSERT. A record served again later in the run fails that page's first statement,
    which writes nothing, and the page is upserted, as every page after it: the newest
    version wins, and the counters and the checkpoint are the pages'. A tenant with records
    stored is upserted from its run's start."""
    raw = PgStore.open(_info(store_url))
    name = ("t1", Scope.PRODUCT.value)
    try:
        with raw.lease("t1", Scope.PRODUCT):
            run_id = raw.start_run("t1", Scope.PRODUCT, trigger="manual", now=NOW)
            assert name in raw._first_load

            def page(number: int, records: list[Accepted]) -> tuple[int, int]:
                outcome = raw.apply_page(
                    run_id=run_id, tenant="t1", scope=Scope.PRODUCT, page=str(number),
                    accepted=records, rejections=[], normalised=0, now=NOW,
                    checkpoint=Checkpoint(next_number=number + 1, next_page=number + 1))
                return outcome.applied, outcome.stale

            assert page(1, [_product(1, 1), _product(2, 1)]) == (2, 0)
            assert name in raw._first_load
            assert page(2, [_product(3, 1), _product(1, 5)]) == (2, 0)  # p1 again, newer
            assert name not in raw._first_load
            assert page(3, [_product(2, 0), _product(4, 1)]) == (1, 1)  # p2 again, older
            stats = raw.finish_run(run_id, status="succeeded", now=NOW)
        assert name not in raw._first_load
        assert (stats.pages, stats.accepted, stats.stale) == (3, 5, 1)
        assert raw.load_checkpoint("t1", Scope.PRODUCT) == Checkpoint(4, 4, None)
        with raw.lease("t1", Scope.PRODUCT):
            raw.start_run("t1", Scope.PRODUCT, trigger="manual", now=NOW)
            assert name not in raw._first_load  # t1 has records now
        with raw.lease("t2", Scope.PRODUCT):
            raw.start_run("t2", Scope.PRODUCT, trigger="manual", now=NOW)
            assert ("t2", Scope.PRODUCT.value) in raw._first_load  # t2 has none
    finally:
        raw.close()
    engine = create_store_engine(store_url)
    try:
        with engine.connect() as conn:
            stored = conn.exec_driver_sql(
                "SELECT product_id, payload->>'version', run_id FROM products "
                "ORDER BY product_id").all()
    finally:
        engine.dispose()
    assert [tuple(row) for row in stored] == [
        ("p1", "5", run_id), ("p2", "1", run_id), ("p3", "1", run_id), ("p4", "1", run_id)]


def test_an_unreachable_database_is_a_store_error_with_what_to_do() -> None:
    with pytest.raises(errors.StoreError, match="reachable"):
        PgStore.open("postgresql://postgres@127.0.0.1:1/none?connect_timeout=2")


