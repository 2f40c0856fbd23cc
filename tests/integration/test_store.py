"""The store on both backends: one transaction per page, newest-wins in SQL, runs, UTC."""

from __future__ import annotations

import dataclasses
import pickle
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from puller import errors, forms, schema, sqlite_store, upsert
from puller.domain import Accepted, Checkpoint, Rejection, Scope
from puller.records import validate_page
from puller.store import Store
from puller.tenant_server import make_customer, make_product
from tests.conftest import BACKENDS

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def _products(*versions: tuple[str, str]) -> list[Accepted]:
    raws = [make_product(i, product_id=pid, last_modified_date=ts)
            for i, (pid, ts) in enumerate(versions)]
    page = validate_page(Scope.PRODUCT, raws)
    assert not page.rejections
    return page.accepted


def _apply(store: Store, run_id: int, accepted: list[Accepted], *,
           rejections: list[Rejection] | None = None, checkpoint: Checkpoint | None = None,
           page: str = "1") -> tuple[int, int]:
    outcome = store.apply_page(run_id=run_id, tenant="acme", scope=Scope.PRODUCT, page=page,
                               accepted=accepted, rejections=rejections or [],
                               checkpoint=checkpoint or Checkpoint(), normalised=0, now=NOW)
    return outcome.applied, outcome.stale


def _stored(store: Store) -> dict[str, datetime]:
    with store.engine.connect() as conn:
        return {r.product_id: r.last_modified_date for r in conn.execute(
            sa.select(schema.products.c.product_id, schema.products.c.last_modified_date))}


@BACKENDS
def test_newest_wins_compares_instants_not_text(store: Store) -> None:
    """10:30+02:00 (08:30Z) is older than 09:00Z even though its text sorts later."""
    run = store.start_run("acme", Scope.PRODUCT, trigger="test", now=NOW)
    assert _apply(store, run, _products(("p1", "2024-12-01T10:30:00+02:00"))) == (1, 0)
    assert _apply(store, run, _products(("p1", "2024-12-01T09:00:00Z"))) == (1, 0)
    assert _stored(store)["p1"] == datetime(2024, 12, 1, 9, 0, tzinfo=UTC)
    assert _apply(store, run, _products(("p1", "2024-12-01T10:59:59+02:00"))) == (0, 1)
    assert _apply(store, run, _products(("p1", "2024-12-01T09:00:00.000001Z"))) == (1, 0)


@BACKENDS
def test_equal_timestamp_is_stale_and_changes_nothing(store: Store) -> None:
    """Re-applying the same version is stale; the stored row keeps its first run id."""
    first = store.start_run("acme", Scope.PRODUCT, trigger="test", now=NOW)
    _apply(store, first, _products(("p1", "2024-12-01T00:00:00Z")))
    second = store.start_run("acme", Scope.PRODUCT, trigger="test", now=NOW)
    assert _apply(store, second, _products(("p1", "2024-12-01T00:00:00Z"))) == (0, 1)
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(schema.products.c.run_id)).scalar_one() == first


@BACKENDS
def test_a_page_is_one_transaction(store: Store) -> None:
    """If any write of a page fails, none of it is kept: no records, counters or checkpoint."""
    run = store.start_run("acme", Scope.PRODUCT, trigger="test", now=NOW)
    with store.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE checkpoints"))
    with pytest.raises(errors.StoreError, match="nothing of this step was written"):
        _apply(store, run, _products(("p1", "2024-12-01T00:00:00Z")),
               rejections=[Rejection(1, {"x": 1}, ("product_id: required field is missing",))],
               checkpoint=Checkpoint(2, 2, None))
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.products)
                            ).scalar_one() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.rejected_records)
                            ).scalar_one() == 0
        row = conn.execute(sa.select(schema.runs)).one()
    assert (row.pages, row.accepted, row.rejected) == (0, 0, 0)


@BACKENDS
def test_page_writes_records_rejections_counters_and_checkpoint_together(store: Store) -> None:
    """A committed page carries all four writes."""
    run = store.start_run("acme", Scope.PRODUCT, trigger="test", now=NOW)
    _apply(store, run, _products(("p1", "2024-12-01T00:00:00Z"), ("p2", "2024-12-01T00:00:00Z")),
           rejections=[Rejection(2, ["not", "an", "object"], ("record is a list",))],
           checkpoint=Checkpoint(2, 2, None), page="1")
    assert store.load_checkpoint("acme", Scope.PRODUCT) == Checkpoint(2, 2, None)
    stats = store.finish_run(run, status="succeeded", now=NOW)
    assert (stats.pages, stats.accepted, stats.rejected) == (1, 2, 1)
    with store.engine.connect() as conn:
        rejected = conn.execute(sa.select(schema.rejected_records)).one()
    assert rejected.record == ["not", "an", "object"] and rejected.position == 2


@BACKENDS
def test_unfinished_runs_are_marked_abandoned_by_the_next_run(store: Store) -> None:
    """A run left `running` by a killed process is `abandoned` when the next one starts."""
    killed = store.start_run("acme", Scope.PRODUCT, trigger="test", now=NOW)
    other_scope = store.start_run("acme", Scope.CUSTOMER, trigger="test", now=NOW)
    store.start_run("acme", Scope.PRODUCT, trigger="test", now=NOW + timedelta(minutes=1))
    with store.engine.connect() as conn:
        status = dict(conn.execute(sa.select(schema.runs.c.id, schema.runs.c.status)).all())
    assert status[killed] == "abandoned" and status[other_scope] == "running"


@BACKENDS
def test_customer_columns_and_extra_round_trip(store: Store) -> None:
    """Customer columns and non-ASCII extras come back as stored, timestamps aware UTC."""
    raw = make_customer(7, nickname="Zoë", tags=["ä", 1, None])
    page = validate_page(Scope.CUSTOMER, [raw])
    run = store.start_run("acme", Scope.CUSTOMER, trigger="test", now=NOW)
    store.apply_page(run_id=run, tenant="acme", scope=Scope.CUSTOMER, page="1",
                     accepted=page.accepted, rejections=[], checkpoint=Checkpoint(),
                     normalised=0, now=NOW)
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(schema.customers)).one()
    assert row.extra == {"loyalty_tier": "silver", "nickname": "Zoë", "tags": ["ä", 1, None]}
    assert row.first_name == raw["first_name"] and row.last_name == raw["last_name"]
    assert row.last_modified_date.tzinfo is not None and row.stored_at == NOW


@BACKENDS
def test_rows_made_elsewhere_are_stamped_with_the_applying_run_and_time(store: Store) -> None:
    """Records put in the store's form by the fetch process (another run id and clock)
    store the same as records given as such: newest per id, duplicates stale, and the
    run and time of the page that applies them."""
    versions = [("p1", "2024-12-01T00:00:00Z"), ("p2", "2024-12-01T00:00:00Z"),
                ("p1", "2024-12-02T00:00:00Z")]
    run = store.start_run("acme", Scope.PRODUCT, trigger="test", now=NOW)
    rows = forms.prepare(_products(*versions), Scope.PRODUCT, store.engine.dialect.name)
    outcome = store.apply_page(run_id=run, tenant="acme", scope=Scope.PRODUCT, page="1",
                               accepted=[], rejections=[], checkpoint=Checkpoint(2, 2, None),
                               normalised=0, now=NOW, rows=rows)
    assert (outcome.applied, outcome.stale) == (2, 1)
    with store.engine.connect() as conn:
        stored = {r.product_id: r for r in conn.execute(sa.select(schema.products))}
    assert stored["p1"].last_modified_date == datetime(2024, 12, 2, tzinfo=UTC)
    assert {(r.run_id, r.stored_at) for r in stored.values()} == {(run, NOW)}
    stats = store.finish_run(run, status="succeeded", now=NOW)
    assert (stats.pages, stats.accepted, stats.stale) == (1, 2, 1)
    assert store.load_checkpoint("acme", Scope.PRODUCT) == Checkpoint(2, 2, None)


def test_unsupported_store_url_says_what_to_use() -> None:
    """A store URL of another kind is refused with the supported forms."""
    with pytest.raises(errors.StoreError, match="use sqlite:///PATH or postgresql"):
        Store.open("mysql://root@localhost/x")


def test_the_row_layouts_are_checked_against_the_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """forms.py builds rows without SQLAlchemy, from its own LAYOUTS: upsert checks them
    against schema.py at import, so a schema edit that forgets forms.py cannot store one
    column's value in another."""
    upsert.check_layouts()  # as imported
    plain, documents = forms.LAYOUTS[Scope.CUSTOMER]
    swapped = (plain[1], plain[0], *plain[2:])
    for wrong in ((swapped, documents), (plain, ()), ((*plain, *documents), ())):
        monkeypatch.setitem(upsert.LAYOUTS, Scope.CUSTOMER, wrong)
        with pytest.raises(AssertionError, match="customer columns are"):
            upsert.check_layouts()


def test_sqlite_rows_pickled_through_the_pipe_arrive_whole_or_not_at_all(tmp_path: Path) -> None:
    """SQLite rows cross the fetch process's pipe as one NUL-joined text (StoreRows's
    pickling). They arrive as sent; a value holding a NUL, which the fetch process never
    sends, would split into too many values, and the store refuses the page instead of
    storing columns in each other's places."""
    store = Store.open(f"sqlite:///{tmp_path / 'pipe.db'}")
    try:
        run = store.start_run("acme", Scope.PRODUCT, trigger="test", now=NOW)
        rows = forms.prepare(_products(("p1", "2024-12-01T00:00:00Z"),
                                       ("p2", "2024-12-01T00:00:00Z")), Scope.PRODUCT, "sqlite")
        sent = pickle.loads(pickle.dumps(rows))  # noqa: S301 - made here
        assert sent == rows and sent.payload is not rows.payload
        broken = pickle.loads(pickle.dumps(dataclasses.replace(  # noqa: S301 - made here
            rows, payload=[rows.payload[0] + "\x00x", *rows.payload[1:]])))
        with pytest.raises(AssertionError, match="9 values for 2 product rows"):
            store.apply_page(run_id=run, tenant="acme", scope=Scope.PRODUCT, page="1",
                             accepted=[], rejections=[], checkpoint=Checkpoint(2, 2, None),
                             normalised=0, now=NOW, rows=broken)
        store.apply_page(run_id=run, tenant="acme", scope=Scope.PRODUCT, page="1", accepted=[],
                         rejections=[], checkpoint=Checkpoint(2, 2, None), normalised=0,
                         now=NOW, rows=sent)
        assert set(_stored(store)) == {"p1", "p2"}
    finally:
        store.close()


@pytest.mark.parametrize("variables", [32766, 100], ids=["sqlite-default", "100-variables"])
def test_sqlite_upsert_applies_every_row_in_blocks_and_newest_wins(
    tmp_path: Path, variables: int,
) -> None:
    """SQLite takes a page as multi-row VALUES in blocks of a power of two rows, within its
    limit on bound variables: all 1,100 rows are applied (512 + 512 + 64 + 8 + 4 rows, or
    blocks of 4 under a limit of 100 variables), and a block's stale rows change nothing."""
    store = Store.open(f"sqlite:///{tmp_path / 'blocks.db'}")
    pooled = store.engine.raw_connection()
    try:
        db: sqlite3.Connection = pooled.driver_connection  # type: ignore[assignment]
        db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, variables)
        run_id = store.start_run("acme", Scope.PRODUCT, trigger="test", now=NOW)
        first = _products(*[(f"p{i}", "2024-12-01T10:00:00Z") for i in range(1100)])
        second = _products(*[(f"p{i}", "2024-12-02T10:00:00Z" if i % 2 == 0
                              else "2024-11-01T10:00:00Z") for i in range(1100)])
        for page, applied in ((first, 1100), (second, 550)):
            rows = forms.sqlite_rows(page, Scope.PRODUCT)
            before = db.total_changes
            db.execute("BEGIN")
            sqlite_store.upsert(db, Scope.PRODUCT, rows, tenant="acme", run_id=run_id, now=NOW)
            db.execute("COMMIT")
            assert db.total_changes - before == applied
    finally:
        pooled.close()
    stored = _stored(store)
    store.close()
    assert len(stored) == 1100
    assert stored["p0"] == datetime(2024, 12, 2, 10, tzinfo=UTC)  # newer: applied
    assert stored["p1"] == datetime(2024, 12, 1, 10, tzinfo=UTC)  # older: stale


def test_sqlite_writes_from_many_threads_take_turns_on_one_connection(tmp_path: Path) -> None:
    """Eight threads applying pages at once (eight sweeps) all commit, through the store's
    one SQLite writer connection in turn: no pooled connection each, whose page cache
    another connection's writes would void, and no wait in SQLite's busy handler. A page
    that fails is rolled back and the writer goes on."""
    store = Store.open(f"sqlite:///{tmp_path / 'turns.db'}")
    try:
        def sweep(tenant: str) -> None:
            run = store.start_run(tenant, Scope.PRODUCT, trigger="test", now=NOW)
            for page in range(10):
                store.apply_page(
                    run_id=run, tenant=tenant, scope=Scope.PRODUCT, page=str(page + 1),
                    accepted=_products(*[(f"p{page}-{i}", "2024-12-01T00:00:00Z")
                                         for i in range(20)]),
                    rejections=[], checkpoint=Checkpoint(page + 2, page + 2, None),
                    normalised=0, now=NOW)
            assert store.finish_run(run, status="succeeded", now=NOW).accepted == 200

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(sweep, [f"t{n}" for n in range(8)]))
        assert store.kept_connections == 1
        assert store.engine.pool.checkedout() == 1  # type: ignore[attr-defined]
        with store.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(schema.products)
                                ).scalar_one() == 8 * 200
        broken = dataclasses.replace(forms.prepare(_products(("p", "2024-12-01T00:00:00Z")),
                                                   Scope.PRODUCT, "sqlite"), survivors=2)
        with pytest.raises(AssertionError):  # refused before the transaction
            store.apply_page(run_id=1, tenant="t0", scope=Scope.PRODUCT, page="11",
                             accepted=[], rejections=[], checkpoint=Checkpoint(12, 12, None),
                             normalised=0, now=NOW, rows=broken)
        with pytest.raises(errors.StoreError, match="nothing of this step was written"):
            store.apply_page(run_id=1, tenant="t0", scope=Scope.PRODUCT, page="11",
                             accepted=[], rejections=[Rejection(0, {}, ("x",))],
                             checkpoint=Checkpoint(None, 12, None),  # type: ignore[arg-type]
                             normalised=0, now=NOW)  # next_number NOT NULL: IntegrityError
        assert store.load_checkpoint("t0", Scope.PRODUCT) == Checkpoint(11, 11, None)
    finally:
        store.close()
