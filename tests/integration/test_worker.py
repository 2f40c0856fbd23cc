"""The worker with short real intervals, a real loopback tenant server and a real store."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from puller import client, errors, schema
from puller.config import PullerConfig
from puller.domain import Checkpoint, Rejection, Scope
from puller.ops_server import OpsServer
from puller.records import validate_page
from puller.store import Store
from puller.tenant_server import Fault, TenantServer, make_customer, make_product
from puller.worker import Worker
from tests.conftest import BACKENDS, add_dataset, captured_logs

FAST = {"startup_jitter": 0, "failure_backoff": "0.4s", "shutdown_grace": "5s"}


def worker_config(server: TenantServer, store_url: str, tenants: dict[str, dict[str, Any]],
                  **worker: Any) -> PullerConfig:
    """tenants maps id → {scope: callback overrides}; every callback gets a schedule."""
    return PullerConfig.model_validate({
        "store": store_url, "allow_private_networks": True,
        "retry": {"attempts": 2, "initial_wait": 0.01, "max_wait": 0.02},
        "worker": {**FAST, **worker},
        "tenants": [{"id": tid, "shop": f"{tid}.example.com", "callbacks": {
            scope: {"url": f"{server.url}/{tid}/{scope}s", "schedule": {"every": "0.3s"}, **over}
            for scope, over in scopes.items()}} for tid, scopes in tenants.items()],
    })


@contextlib.asynccontextmanager
async def running(config: PullerConfig, store: Store,
                  load: Callable[[], PullerConfig] | None = None) -> AsyncIterator[Worker]:
    async with client.HttpClients(allow_private_networks=True) as http:
        worker = Worker(config, load_config=load or (lambda: config), store=store, http=http)
        task = asyncio.create_task(worker.run())
        try:
            yield worker
        finally:
            worker.stop()
            await asyncio.wait_for(task, timeout=15)


def runs(store: Store, tenant: str | None = None) -> list[dict[str, Any]]:
    return [r for r in reversed(store.list_runs(limit=10_000))
            if tenant is None or r["tenant_id"] == tenant]


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def succeeded(store: Store, tenant: str, scope: str) -> int:
    return sum(1 for r in runs(store, tenant) if r["scope"] == scope and r["status"] == "succeeded")


def max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals],
                    key=lambda e: (e[0], e[1]))
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def intervals(rows: list[dict[str, Any]]) -> list[tuple[datetime, datetime]]:
    return [(r["started_at"], r["finished_at"]) for r in rows if r["finished_at"] is not None]


async def test_every_scheduled_callback_is_pulled_repeatedly(
    tenant_server: TenantServer, store: Store, store_url: str
) -> None:
    """Each callback's schedule becomes a job; two tenants, two scopes each all run, repeatedly."""
    for tid in ("wa", "wb"):
        add_dataset(tenant_server, tid, customers=30, products=10)
    config = worker_config(tenant_server, store_url,
                           {"wa": {"customer": {}, "product": {}},
                            "wb": {"customer": {}, "product": {}}})
    async with running(config, store):
        await until(lambda: all(succeeded(store, t, s) >= 2 for t in ("wa", "wb")
                                for s in ("customer", "product")))
    assert store.count_records("wa", Scope.CUSTOMER) == 30
    assert store.count_records("wb", Scope.PRODUCT) == 10


async def test_a_run_never_overlaps_itself_and_missed_runs_coalesce(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """A sweep longer than its interval is not overlapped; the missed fires become one run."""
    data = add_dataset(tenant_server, tenant_id, customers=40)
    data.page_delay_s = 0.06  # 8 pages ≈ 0.5 s, schedule every 0.1 s
    config = worker_config(tenant_server, store_url, {tenant_id: {
        "customer": {"page_size": 5, "schedule": {"every": "0.1s"}}}})
    async with running(config, store):
        await asyncio.sleep(2.2)
    history = runs(store, tenant_id)
    assert max_overlap(intervals(history)) == 1
    assert 2 <= len(history) <= 5, "about 2.2 s / 0.5 s runs, not 22 fires"


async def test_order_waits_for_customer_and_product_of_its_tenant(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """When due together, order starts only after that tenant's customer and product end."""
    data = add_dataset(tenant_server, tenant_id, customers=30, products=30, orders=10)
    data.page_delay_s = 0.03
    config = worker_config(tenant_server, store_url, {tenant_id: {
        "order": {"schedule": {"every": "0.5s"}}, "customer": {"page_size": 5, "schedule":
        {"every": "0.5s"}}, "product": {"page_size": 5, "schedule": {"every": "0.5s"}}}})
    async with running(config, store):
        await until(lambda: succeeded(store, tenant_id, "order") >= 3)
    history = runs(store, tenant_id)
    orders = [r for r in history if r["scope"] == "order" and r["finished_at"]]
    firsts = [r for r in history if r["scope"] != "order" and r["finished_at"]]
    for order in orders:
        for other in firsts:
            overlaps = other["started_at"] < order["finished_at"] and \
                order["started_at"] < other["finished_at"]
            assert not overlaps, (order, other)


async def test_global_and_per_tenant_caps_hold(
    tenant_server: TenantServer, store: Store, store_url: str
) -> None:
    """max_concurrent_runs and max_runs_per_tenant bound what runs at once (from the runs table)."""
    tenants = [f"cap{i}" for i in range(4)]
    for tid in tenants:
        data = add_dataset(tenant_server, tid, customers=20, products=20)
        data.page_delay_s = 0.03
    config = worker_config(tenant_server, store_url, {
        tid: {"customer": {"page_size": 5, "schedule": {"every": "0.2s"}},
              "product": {"page_size": 5, "schedule": {"every": "0.2s"}}} for tid in tenants},
        max_concurrent_runs=3, max_runs_per_tenant=1)
    async with running(config, store):
        await until(lambda: all(succeeded(store, t, s) >= 1 for t in tenants
                                for s in ("customer", "product")), timeout_s=20)
    history = [r for r in runs(store) if r["tenant_id"] in tenants]
    assert max_overlap(intervals(history)) == 3, "the global cap is reached, never passed"
    for tid in tenants:
        assert max_overlap(intervals([r for r in history if r["tenant_id"] == tid])) == 1


async def test_a_hanging_tenant_does_not_delay_the_others(
    tenant_server: TenantServer, store: Store, store_url: str
) -> None:
    """A tenant whose server hangs holds one slot; the other tenant keeps its schedule."""
    add_dataset(tenant_server, "hang", customers=5)
    add_dataset(tenant_server, "fine", customers=5)
    tenant_server.fail_next("hang", "customers", *[Fault(delay_s=8)] * 3)
    config = worker_config(tenant_server, store_url, {
        "hang": {"customer": {"timeout": "20s"}}, "fine": {"customer": {}}},
        shutdown_grace="0.5s")
    async with running(config, store):
        started = time.monotonic()
        await until(lambda: succeeded(store, "fine", "customer") >= 4, timeout_s=5)
        elapsed = time.monotonic() - started
    assert elapsed < 3.0
    assert succeeded(store, "hang", "customer") == 0


async def test_a_failing_tenant_backs_off_and_recovers(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """Failed runs space out (growing back-off); a success resets the count; the worker lives."""
    add_dataset(tenant_server, tenant_id, customers=5)
    tenant_server.fail_next(tenant_id, "customers", *[Fault(status=404)] * 4)
    config = worker_config(tenant_server, store_url, {tenant_id: {
        "customer": {"schedule": {"every": "0.1s"}}}}, failure_backoff="0.3s")
    labels = {"tenant": tenant_id, "scope": "customer"}
    async with running(config, store) as worker:
        metric = worker.metrics.registry.get_sample_value
        # The store holds the finished run a moment before the worker has counted it: wait
        # for the worker's own count, then read the gauges it sets in the same step.
        await until(lambda: (metric("puller_runs_total", {**labels, "status": "succeeded"})
                             or 0) >= 1, timeout_s=10)
        assert succeeded(store, tenant_id, "customer") >= 1
        assert metric("puller_consecutive_failures", labels) == 0
        assert metric("puller_http_errors_total", {**labels, "status": "404"}) == 4
        assert (metric("puller_last_success_timestamp_seconds", labels) or 0) > 0
    failed = [r for r in runs(store, tenant_id) if r["status"] == "failed"]
    assert len(failed) == 4
    gaps = [(b["started_at"] - a["started_at"]).total_seconds()
            for a, b in itertools.pairwise(failed)]
    assert gaps[0] >= 0.25 and gaps[-1] >= 1.0, gaps  # 0.3 s, 0.6 s, 1.2 s


async def test_reload_adds_removes_and_refuses_an_invalid_config(
    tenant_server: TenantServer, store: Store, store_url: str
) -> None:
    """SIGHUP semantics: new tenants start, removed ones stop, an invalid file is refused."""
    add_dataset(tenant_server, "ra", customers=5)
    add_dataset(tenant_server, "rb", customers=5)
    configs: list[Any] = [worker_config(tenant_server, store_url, {"ra": {"customer": {}}})]

    def load() -> PullerConfig:
        current = configs[-1]
        if isinstance(current, Exception):
            raise current
        return current  # type: ignore[no-any-return]

    async with running(configs[0], store, load) as worker:
        await until(lambda: succeeded(store, "ra", "customer") >= 1)
        configs.append(worker_config(tenant_server, store_url, {"rb": {"customer": {}}}))
        worker.reload()
        await until(lambda: succeeded(store, "rb", "customer") >= 2)
        ra_runs = len(runs(store, "ra"))
        configs.append(errors.ConfigError(path="tenants", problem="broken on purpose"))
        with captured_logs() as events:
            worker.reload()
        await until(lambda: succeeded(store, "rb", "customer") >= 4)
    assert len(runs(store, "ra")) == ra_runs, "a removed tenant is no longer pulled"
    (failure,) = [e for e in events if e["event"] == "config_reload_failed"]
    assert "broken on purpose" in failure["error"]


async def test_metrics_and_health_endpoints(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """/metrics exposes puller_* series; /healthz is 503 while the event loop is stuck."""
    add_dataset(tenant_server, tenant_id, customers=12)
    tenant_server.fail_next(tenant_id, "customers", Fault(status=503))
    config = worker_config(tenant_server, store_url, {tenant_id: {"customer": {"page_size": 5}}},
                           stuck_after="1s")
    async with running(config, store) as worker:
        ops = OpsServer(worker, host="127.0.0.1", port=0).start()
        try:
            await until(lambda: succeeded(store, tenant_id, "customer") >= 1)
            base = f"http://127.0.0.1:{ops.port}"
            text = (await asyncio.to_thread(_get, f"{base}/metrics"))[1]
            for name in ("puller_pages_fetched_total", "puller_records_total",
                         "puller_run_duration_seconds_bucket", "puller_runs_in_flight",
                         "puller_last_success_timestamp_seconds",
                         "puller_consecutive_failures"):
                assert name in text, name
            series = f'outcome="accepted",scope="customer",tenant="{tenant_id}"'
            assert f"puller_records_total{{{series}}} 12.0" in text
            labels = f'scope="customer",tenant="{tenant_id}"'
            assert f"puller_retries_total{{{labels}}} 1.0" in text
            errors_503 = f'scope="customer",status="503",tenant="{tenant_id}"'
            assert f"puller_http_errors_total{{{errors_503}}} 1.0" in text
            assert (await asyncio.to_thread(_get, f"{base}/healthz"))[0] == 200
            seen: list[int] = []
            poller = threading.Thread(target=lambda: [seen.append(_get(f"{base}/healthz")[0])
                                                      or time.sleep(0.2) for _ in range(12)])
            poller.start()
            time.sleep(2.0)  # noqa: ASYNC251 - blocks the event loop on purpose: a stuck loop
            await asyncio.to_thread(poller.join)
            assert 503 in seen and seen[-1] == 200
        finally:
            ops.stop()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_shutdown_lets_the_page_in_flight_commit_then_records_interrupted(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """stop(): no new runs; the run in flight ends after its current page as `interrupted`."""
    data = add_dataset(tenant_server, tenant_id, customers=100)
    data.page_delay_s = 0.1
    config = worker_config(tenant_server, store_url, {tenant_id: {"customer": {"page_size": 5}}})
    async with running(config, store):
        await until(lambda: store.load_checkpoint(tenant_id, Scope.CUSTOMER).next_number >= 3)
    (run,) = runs(store, tenant_id)
    assert run["status"] == "interrupted" and 2 <= run["pages"] < 20
    checkpoint = store.load_checkpoint(tenant_id, Scope.CUSTOMER)
    assert checkpoint == Checkpoint(run["pages"] + 1, run["pages"] + 1, None)
    assert store.count_records(tenant_id, Scope.CUSTOMER) == 5 * run["pages"]


@BACKENDS
async def test_maintenance_purges_expired_soft_deletes_rejects_and_runs(
    tenant_server: TenantServer, store: Store, store_url: str
) -> None:
    """The daily job removes soft-deleted records past retention, old rejects and old runs."""
    now = datetime(2026, 11, 25, tzinfo=UTC)
    old, recent = now - timedelta(days=100), now - timedelta(days=5)
    raws = [make_product(1, deleted_at=old.isoformat()),
            make_product(2, deleted_at=recent.isoformat()), make_product(3)]
    page = validate_page(Scope.PRODUCT, raws)
    run = store.start_run("m", Scope.PRODUCT, trigger="test", now=old)
    store.apply_page(run_id=run, tenant="m", scope=Scope.PRODUCT, page="1",
                     accepted=page.accepted, normalised=0, now=old, checkpoint=Checkpoint(),
                     rejections=[Rejection(0, {"x": 1}, ("bad",))])
    store.finish_run(run, status="succeeded", now=old)
    config = worker_config(tenant_server, store_url, {})
    async with running(config, store) as worker:
        removed = await worker.maintain(now)
    assert removed == {"customer": 0, "order": 0, "product": 1, "rejected": 1, "runs": 1}
    with store.engine.connect() as conn:
        left = sorted(conn.execute(sa.select(schema.products.c.product_id)).scalars())
    assert left == ["p2", "p3"]


@BACKENDS
def test_forget_erases_the_customer_and_rejects_carrying_it(store: Store) -> None:
    """forget removes the customer row and rejected records (any scope) with that id only."""
    now = datetime(2026, 11, 25, tzinfo=UTC)
    page = validate_page(Scope.CUSTOMER, [make_customer(1), make_customer(2)])
    run = store.start_run("g", Scope.CUSTOMER, trigger="test", now=now)
    rejects = [Rejection(0, make_customer(1, email="bad"), ("email: bad",)),
               Rejection(1, {"order_id": "o1", "customer_id": "c1"}, ("x",)),
               Rejection(2, make_customer(2, email="bad"), ("email: bad",))]
    store.apply_page(run_id=run, tenant="g", scope=Scope.CUSTOMER, page="1",
                     accepted=page.accepted, rejections=rejects, checkpoint=Checkpoint(),
                     normalised=0, now=now)
    assert store.forget_customer("g", "c1") == {"customers": 1, "rejected": 2}
    assert store.forget_customer("other-tenant", "c2") == {"customers": 0, "rejected": 0}
    with store.engine.connect() as conn:
        assert list(conn.execute(sa.select(schema.customers.c.customer_id)).scalars()) == ["c2"]
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.rejected_records)
                            ).scalar_one() == 1
