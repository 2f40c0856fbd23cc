"""Property-based, on a real store: any sequence of pages converges to the newest versions."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from puller import schema
from puller.domain import Checkpoint, Scope
from puller.records import validate_page
from puller.store import Store
from puller.tenant_server import make_product, timestamp
from tests.conftest import BACKENDS

NOW = datetime(2026, 11, 25, tzinfo=UTC)
_tenants = itertools.count()

# A version is (product id, minute); a page is a list of versions; pages may replay,
# reorder and duplicate versions, within a page and across pages.
versions = st.tuples(st.integers(0, 6), st.integers(0, 20))
pages = st.lists(st.lists(versions, max_size=8), min_size=1, max_size=8)


@BACKENDS
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sweep=pages)
def test_any_page_sequence_converges_to_the_newest_version(
    store: Store, sweep: list[list[tuple[int, int]]]
) -> None:
    """Whatever the order, replays and duplicates, each id ends at its newest version, and
    accepted + stale counts every record exactly once."""
    tenant = f"prop{next(_tenants)}"
    run = store.start_run(tenant, Scope.PRODUCT, trigger="test", now=NOW)
    applied = stale = 0
    for number, page in enumerate(sweep, start=1):
        raws = [make_product(0, product_id=f"p{pid}", last_modified_date=timestamp(minute),
                             title=f"v{minute}") for pid, minute in page]
        valid = validate_page(Scope.PRODUCT, raws)
        outcome = store.apply_page(run_id=run, tenant=tenant, scope=Scope.PRODUCT,
                                   page=str(number), accepted=valid.accepted, rejections=[],
                                   checkpoint=Checkpoint(number + 1, number + 1, None),
                                   normalised=0, now=NOW)
        applied, stale = applied + outcome.applied, stale + outcome.stale
    newest: dict[int, int] = {}
    for page in sweep:
        for pid, minute in page:
            newest[pid] = max(minute, newest.get(pid, minute))
    with store.engine.connect() as conn:
        rows = conn.execute(schema.products.select().where(
            schema.products.c.tenant_id == tenant)).all()
    assert {r.product_id: r.payload["title"] for r in rows} == {
        f"p{pid}": f"v{minute}" for pid, minute in newest.items()}
    assert applied + stale == sum(len(p) for p in sweep)
