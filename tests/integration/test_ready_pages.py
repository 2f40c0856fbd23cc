"""Pages fetched ahead are applied together in one thread call (applying._apply_ready), or
on the feed's own thread as the feed pushes them (applying._apply_pushed, the fetch
process's feed), with the same semantics as one page at a time: one transaction per page,
in order, the checkpoint with the page, a failure raised only after the pages before it,
the hooks and credits per page, and a stop honoured after the page in hand. A feed that
has every page ready at once makes the batches deterministic; the store is real."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from puller import errors, pipeline
from puller.config import PullerConfig
from puller.domain import (
    Accepted,
    Checkpoint,
    PageOutcome,
    PageRequest,
    Rejection,
    RunResult,
    Scope,
    StoreRows,
)
from puller.records import validate_page
from puller.store import Store
from puller.tenant_server import make_customer
from tests.conftest import BACKENDS

PAGES = 4
SIZE = 5


class ReadyFeed:
    """Every page of the sweep waiting from the start, then `failure` (if any) or the end."""

    def __init__(self, failure: Exception | None = None) -> None:
        self.items: list[pipeline.Fetched | Exception | None] = []
        for number in range(1, PAGES + 1):
            request = PageRequest(number=number, page_size=SIZE, page=number)
            following = (PageRequest(number=number + 1, page_size=SIZE, page=number + 1)
                         if number < PAGES or failure is not None else None)
            people = [make_customer(i) for i in range((number - 1) * SIZE, number * SIZE)]
            self.items.append(pipeline.Fetched(request=request, following=following,
                                               page=validate_page(Scope.CUSTOMER, people),
                                               records=SIZE))
        self.items.append(failure)
        self.credits = 0

    async def next(self) -> pipeline.Fetched | None:
        return self.take(self.items.pop(0))

    @staticmethod
    def take(item: pipeline.Fetched | Exception | None) -> pipeline.Fetched | None:
        """The page, None at the end, or the failure raised."""
        if isinstance(item, Exception):
            raise item
        return item

    def applied(self) -> None:
        self.credits += 1

    def ready(self) -> bool:
        return bool(self.items)

    async def aclose(self) -> None:
        return None


class ReadyPushFeed(ReadyFeed):
    """The same pages, pushed to the sweep on a thread of the feed's (pipeline.PushFeed),
    as the fetch process's applier thread does."""

    def push_to(self, step: pipeline.Step) -> None:
        def push() -> None:
            for item in list(self.items):
                step(functools.partial(self.take, item))

        threading.Thread(target=push, daemon=True).start()


FEEDS = pytest.mark.parametrize("feed_kind", [ReadyFeed, ReadyPushFeed],
                                ids=["batches", "pushed"])


class NoRequests:
    async def fetch_page(self, request: PageRequest) -> bytes:
        raise AssertionError("the feed brings every page")

    async def acknowledge(self, ack: Any) -> None:
        raise AssertionError("no commit_url")


class FailingOn:
    """The real store, whose apply_page fails at the `nth` page (a lost database, say)."""

    def __init__(self, store: Store, nth: int) -> None:
        self._store = store
        self._nth = nth
        self._seen = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def apply_page(self, *, run_id: int, tenant: str, scope: Scope, page: str,
                   accepted: list[Accepted], rejections: list[Rejection],
                   checkpoint: Checkpoint, normalised: int, now: datetime,
                   rows: StoreRows | None = None) -> PageOutcome:
        self._seen += 1
        if self._seen == self._nth:
            raise errors.StoreError("the database went away — run again")
        return self._store.apply_page(run_id=run_id, tenant=tenant, scope=scope, page=page,
                                      accepted=accepted, rejections=rejections,
                                      checkpoint=checkpoint, normalised=normalised, now=now,
                                      rows=rows)


def _job(tenant: str, store_url: str) -> pipeline.Job:
    config = PullerConfig.model_validate({
        "store": store_url, "allow_private_networks": True,
        "tenants": [{"id": tenant, "shop": f"{tenant}.example.com",
                     "callbacks": {"customer": {"url": "http://127.0.0.1:9/c",
                                                "page_size": SIZE}}}],
    })
    return pipeline.Job(tenant=config.tenants[0], scope=Scope.CUSTOMER)


async def _sweep(job: pipeline.Job, sink: Any, feed: ReadyFeed, *,
                 should_stop: Callable[[], bool] | None = None,
                 ) -> tuple[RunResult, list[PageOutcome]]:
    seen: list[PageOutcome] = []
    result = await pipeline.run_sweep(
        job, source=NoRequests(), sink=sink, clock=pipeline.SystemClock(),
        on_page=lambda _job, outcome: seen.append(outcome), should_stop=should_stop,
        feeds=lambda _job, _start, _run: feed)
    return result, seen


@FEEDS
@BACKENDS
async def test_pages_waiting_together_are_each_applied_in_order_with_their_checkpoint(
    tenant_id: str, store: Store, store_url: str, feed_kind: type[ReadyFeed],
) -> None:
    feed = feed_kind()
    result, seen = await _sweep(_job(tenant_id, store_url), store, feed)
    assert result.status == "succeeded", result.error
    assert (result.stats.pages, result.stats.accepted) == (PAGES, PAGES * SIZE)
    assert seen == [PageOutcome(applied=SIZE, stale=0)] * PAGES
    assert feed.credits == PAGES
    assert store.count_records(tenant_id, Scope.CUSTOMER) == PAGES * SIZE
    assert store.load_checkpoint(tenant_id, Scope.CUSTOMER) == Checkpoint()  # sweep done


@FEEDS
@BACKENDS
async def test_a_failure_fetched_behind_waiting_pages_is_raised_after_they_are_applied(
    tenant_id: str, store: Store, store_url: str, feed_kind: type[ReadyFeed],
) -> None:
    broken = errors.BrokenPageError(tenant=tenant_id, scope="customer", page=str(PAGES + 1),
                                    reason="not JSON")
    feed = feed_kind(failure=broken)
    result, seen = await _sweep(_job(tenant_id, store_url), store, feed)
    assert result.status == "failed" and result.error == str(broken)
    assert result.stats.pages == PAGES and len(seen) == PAGES == feed.credits
    assert store.load_checkpoint(tenant_id, Scope.CUSTOMER) == Checkpoint(
        next_number=PAGES + 1, next_page=PAGES + 1)


@FEEDS
@BACKENDS
async def test_a_store_failure_inside_a_batch_keeps_and_reports_the_pages_before_it(
    tenant_id: str, store: Store, store_url: str, feed_kind: type[ReadyFeed],
) -> None:
    feed = feed_kind()
    result, seen = await _sweep(_job(tenant_id, store_url), FailingOn(store, 3), feed)
    assert result.status == "failed" and "the database went away" in (result.error or "")
    assert result.stats.pages == 2 and len(seen) == 2 == feed.credits
    assert store.count_records(tenant_id, Scope.CUSTOMER) == 2 * SIZE
    assert store.load_checkpoint(tenant_id, Scope.CUSTOMER) == Checkpoint(
        next_number=3, next_page=3)


@FEEDS
@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_a_stop_asked_within_a_batch_ends_the_run_after_the_page_in_hand(
    tenant_id: str, store: Store, store_url: str, feed_kind: type[ReadyFeed],
) -> None:
    feed = feed_kind()
    asked: list[int] = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) == 2  # asked after page 1, then after page 2: stop

    result, seen = await _sweep(_job(tenant_id, store_url), store, feed,
                                should_stop=should_stop)
    assert result.status == "interrupted"
    assert result.stats.pages == 2 and len(seen) == 2 == feed.credits
    assert store.load_checkpoint(tenant_id, Scope.CUSTOMER) == Checkpoint(
        next_number=3, next_page=3)


class HeldOn(FailingOn):
    """The real store, whose apply_page holds the `nth` page until `release` is set."""

    def __init__(self, store: Store, nth: int) -> None:
        super().__init__(store, nth=0)
        self._held = nth
        self.holding = threading.Event()
        self.release = threading.Event()

    def apply_page(self, **page: Any) -> PageOutcome:
        self._seen += 1
        if self._seen == self._held:
            self.holding.set()
            self.release.wait(10)
        return self._store.apply_page(**page)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_a_cancelled_sweep_waits_for_the_page_in_hand_before_recording_the_run(
    tenant_id: str, store: Store, store_url: str,
) -> None:
    """SIGTERM cancels the pull while the feed's thread is storing a page: the sweep waits
    for that page's transaction, then records the run as interrupted, with that page
    counted and no page after it applied, though the feed goes on pushing them."""
    held = HeldOn(store, 2)
    task = asyncio.create_task(_sweep(_job(tenant_id, store_url), held, ReadyPushFeed()))
    assert await asyncio.to_thread(held.holding.wait, 10)
    task.cancel()
    await asyncio.sleep(0.2)
    assert not task.done(), "the sweep ended while its page was still being stored"
    held.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    (run,) = store.list_runs(tenant=tenant_id)
    assert (run["status"], run["pages"]) == ("interrupted", 2)
    assert store.load_checkpoint(tenant_id, Scope.CUSTOMER) == Checkpoint(
        next_number=3, next_page=3)
