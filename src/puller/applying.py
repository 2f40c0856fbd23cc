"""A sweep's pages applied (SPEC §3): in order, one transaction each, the checkpoint with
the page, while its feed fetches ahead; acknowledged where the callback has a commit_url.
pipeline runs a sweep (its lease, its run row, its outcome) around `sweep`; the feed is
prefetch's, or the fetch process's (fetcher), which pushes pages to an applier thread
(PushFeed). The ports (PageSink, PageFeed) are re-exported by pipeline, part of its API.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Protocol, runtime_checkable

from puller import errors, logs, pagination, prefetch
from puller.domain import (
    Accepted,
    Ack,
    Checkpoint,
    Clock,
    PageOutcome,
    PageRequest,
    Rejection,
    RunStats,
    RunStatus,
    Scope,
    StoreRows,
    ValidatedPage,
)
from puller.prefetch import Fetched, Job, PageSource


class PageSink(Protocol):
    """Where pages go (the store); blocking calls, run in a thread by the pipeline."""

    def lease(self, tenant: str, scope: Scope) -> AbstractContextManager[bool]: ...

    def last_completed_start(self, tenant: str, scope: Scope) -> datetime | None: ...

    def start_run(self, tenant: str, scope: Scope, *, trigger: str, now: datetime) -> int: ...

    def load_checkpoint(self, tenant: str, scope: Scope) -> Checkpoint: ...

    def apply_page(
        self, *, run_id: int, tenant: str, scope: Scope, page: str,
        accepted: Sequence[Accepted], rejections: Sequence[Rejection], checkpoint: Checkpoint,
        normalised: int, now: datetime, rows: StoreRows | None = None,
    ) -> PageOutcome: ...

    def count_failed_ack(self, run_id: int) -> None: ...

    def finish_run(
        self, run_id: int, *, status: RunStatus, now: datetime, error: str | None = None
    ) -> RunStats: ...


PageHook = Callable[[Job, PageOutcome], None]
StopCheck = Callable[[], bool]


class StopRequested(Exception):
    """The worker asked the sweep to stop after the page it just committed."""


class PageFeed(Protocol):
    """Pages fetched ahead of the sweep, in order, at most `prefetch + 1` not yet applied."""

    async def next(self) -> Fetched | None:
        """The next page; None after the last. Raises what fetching it raised."""
        ...

    def applied(self) -> None:
        """The page last returned is applied: one more may be fetched ahead."""
        ...

    def ready(self) -> bool:
        """Whether next() would return at once (a page, the end or an error is waiting)."""
        ...

    async def aclose(self) -> None:
        """Stop fetching; pages asked ahead are dropped."""
        ...


#: one item of a sweep pushed to it (PushFeed): called with `take`, which returns the
#: page, None at the end, or raises what fetching it raised
Step = Callable[[Callable[[], Fetched | None]], None]


@runtime_checkable
class PushFeed(PageFeed, Protocol):
    """A PageFeed that hands each item to the sweep on a thread of its own instead of being
    asked for it (fetcher's: one applier thread for every sweep of the pull)."""

    def push_to(self, step: Step) -> None:
        """Begin the sweep: from now on `step` is called for each of its items, in order, on
        the feed's thread."""
        ...


def applied_in_thread(job: Job) -> bool:
    """Whether a sweep fed by a PushFeed is applied by the feed's thread as its pages come
    (_apply_pushed): when no page waits for an acknowledgement."""
    return job.callback.commit_url is None


#: a feed for (job, its starting checkpoint, the run's id); prefetch.LocalFeed unless given
FeedFactory = Callable[[Job, Checkpoint, int], PageFeed]


async def sweep(
    job: Job, run_id: int, *, source: PageSource, sink: PageSink, clock: Clock,
    on_page: PageHook | None, should_stop: StopCheck | None, feeds: FeedFactory | None,
) -> None:
    """Apply pages in order while a producer fetches up to `prefetch` pages ahead.

    Overlap never changes the semantics (SPEC §3): pages are applied one transaction each,
    in order, the checkpoint with the page; a failure found ahead is raised only after
    every page before it was applied.
    """
    start = await asyncio.to_thread(sink.load_checkpoint, job.tenant.id, job.scope)
    feed = prefetch.LocalFeed(job, start, source) if feeds is None else feeds(job, start, run_id)
    try:
        if job.callback.commit_url is not None:
            # Each page is acknowledged before the next is applied (and, with prefetch 0,
            # before the next is asked for).
            while (item := await feed.next()) is not None:
                with logs.bound(page=item.request.label):
                    await _apply(job, run_id, item, source=source, sink=sink, clock=clock,
                                 on_page=on_page)
                feed.applied()
                if item.following is not None and should_stop is not None and should_stop():
                    raise StopRequested
            return
        if isinstance(feed, PushFeed) and applied_in_thread(job):
            await _apply_pushed(job, run_id, feed, sink=sink, clock=clock, on_page=on_page,
                                should_stop=should_stop)
            return
        while (item := await feed.next()) is not None:
            batch, ahead = await _ready_after(item, feed)
            await _apply_ready(job, run_id, batch, sink=sink, clock=clock, feed=feed,
                               on_page=on_page, should_stop=should_stop)
            if ahead is not None:
                raise ahead
    finally:
        await feed.aclose()


async def _apply_pushed(
    job: Job, run_id: int, feed: PushFeed, *, sink: PageSink, clock: Clock,
    on_page: PageHook | None, should_stop: StopCheck | None,
) -> None:
    """Apply the sweep's pages on the feed's thread as they come: one transaction per
    page, in order, each credited as it commits; the hooks follow on the loop, in order.
    The fetch process's feed pushes a sweep's pages on an applier thread shared with other
    sweeps, in the order they arrive (on SQLite one for all). With a thread of its own a
    sweep, a pull of 100 tenants x 2,000 customers at page size 500 into SQLite took 3.57 s
    against 3.28 s so (6 interleaved rounds), where eight sweeps' threads had handed the
    GIL and the store's lock to each other (29,087 futex calls against 2,242 for one
    tenant of 200,000); into PostgreSQL, with an applier a concurrent sweep, 3.48 -> 3.33 s
    (page size 500) and 6.55 -> 5.98 s (50; 5 rounds each), and 4.99 s with one applier.
    Cancelled, the sweep waits for the page in hand to commit; nothing after it is applied.
    """
    pushed = _Pushed(job, run_id, feed, sink=sink, clock=clock, on_page=on_page,
                     should_stop=should_stop)
    context = contextvars.copy_context()  # the run's log bindings

    def in_context(take: Callable[[], Fetched | None]) -> None:
        context.run(pushed.step, take)

    feed.push_to(in_context)
    try:
        await pushed.done
    except asyncio.CancelledError:
        # No page after the one in hand, which commits before the run is recorded as
        # interrupted, the lease released and the store closed.
        pushed.halted.set()
        await asyncio.shield(asyncio.to_thread(pushed.page_in_hand_done))
        raise


class _Pushed:
    """One sweep's pages as the feed's thread applies them (_apply_pushed): `step` applies
    the page that `take` gives, unless the sweep has halted; `done` is settled on the loop
    at the sweep's end, failure, stop or cancellation."""

    def __init__(self, job: Job, run_id: int, feed: PushFeed, *, sink: PageSink,
                 clock: Clock, on_page: PageHook | None, should_stop: StopCheck | None
                 ) -> None:
        self._job, self._run_id, self._feed = job, run_id, feed
        self._sink, self._clock = sink, clock
        self._on_page, self._should_stop = on_page, should_stop
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self._loop.create_future()
        self._busy = threading.Lock()  # held while a page is applied
        # The loop is woken for a page only if it has something to do for it: a progress
        # hook or the page_applied event (debug). Off a terminal and below debug, a page
        # woke it for nothing: 200,000 customers at page size 50, the main process's CPU
        # 4.55 -> 3.91 and 4.46 -> 4.07 s into SQLite (5 and 4 interleaved rounds), 3.34 ->
        # 2.41 s into PostgreSQL (3); 100 tenants x 2,000 into SQLite 5.38 -> 4.99 s (5).
        self._follow = on_page is not None or logs.debug_enabled()
        self.halted = threading.Event()  # the end, a failure, a stop or a cancellation

    def step(self, take: Callable[[], Fetched | None]) -> None:
        with self._busy:
            if self.halted.is_set():
                return
            outcome: BaseException | None = None
            try:
                fetched = take()
                if fetched is not None:
                    with logs.bound(page=fetched.request.label):
                        applied = _store(self._job, self._run_id, fetched, sink=self._sink,
                                         clock=self._clock)
                    self._feed.applied()
                    if self._follow:
                        self._loop.call_soon_threadsafe(_applied_page, self._job, fetched,
                                                        applied, self._on_page)
                    stop = self._should_stop
                    if fetched.following is None or stop is None or not stop():
                        return
                    raise StopRequested
            except BaseException as exc:  # handed to the sweep, which raises it
                outcome = exc
            self.halted.set()
            with contextlib.suppress(RuntimeError):  # the loop is closed: the pull is over
                self._loop.call_soon_threadsafe(_settle, self.done, outcome)

    def page_in_hand_done(self) -> None:
        """Returns once the page being applied, if any, has committed."""
        with self._busy:
            pass


def _settle(done: asyncio.Future[None], outcome: BaseException | None) -> None:
    if done.done():  # cancelled meanwhile
        return
    if outcome is None:
        done.set_result(None)
    else:
        done.set_exception(outcome)


def _applied_page(job: Job, fetched: Fetched, outcome: PageOutcome,
                  on_page: PageHook | None) -> None:
    with logs.bound(page=fetched.request.label):
        _applied(job, fetched, outcome, on_page)


async def _ready_after(item: Fetched, feed: PageFeed
                       ) -> tuple[list[Fetched], BaseException | None]:
    """`item` and the pages after it that were fetched already; a failure found among them
    is returned, to be raised once the pages before it are applied."""
    batch = [item]
    while batch[-1].following is not None and feed.ready():
        try:
            following = await feed.next()
        except Exception as exc:
            return batch, exc
        if following is None:  # pragma: no cover - the feed ends only after a last page
            break
        batch.append(following)
    return batch, None


async def _apply_ready(
    job: Job, run_id: int, batch: Sequence[Fetched], *, sink: PageSink, clock: Clock,
    feed: PageFeed, on_page: PageHook | None, should_stop: StopCheck | None,
) -> None:
    """Apply pages already fetched, in order, one transaction each, in one thread call.

    A thread call per page cost ~60 us uncontended and ~150 us on two busy cores (the
    page is on the critical path: PostgreSQL waits for it); pages that arrived while the
    one before was applied now share one. Measured with --fetch-process, before a
    thread of the feed's took that case over (_apply_pushed): 7% less at page size 50
    (PostgreSQL, 6 interleaved rounds); without it, PostgreSQL went from 0.96-1.05x to 1.05-1.34x of
    scripts/bench's sequential loop. Each page is credited (`feed.applied`) as soon as it
    is committed, so fetching goes on meanwhile; the progress hooks follow. `should_stop`
    is asked after every committed page, as for one page at a time.
    """
    loop = asyncio.get_running_loop()
    halt = threading.Event()  # the sweep was cancelled: stop after the page in hand

    def apply_all() -> tuple[list[PageOutcome], Exception | None, bool]:
        outcomes: list[PageOutcome] = []
        for fetched in batch:
            try:
                with logs.bound(page=fetched.request.label):
                    outcomes.append(_store(job, run_id, fetched, sink=sink, clock=clock))
            except Exception as exc:  # the pages before it stay applied, and are reported
                return outcomes, exc, False
            loop.call_soon_threadsafe(feed.applied)
            if fetched.following is not None and (
                    halt.is_set() or (should_stop is not None and should_stop())):
                return outcomes, None, True
        return outcomes, None, False

    try:
        outcomes, failure, stopped = await asyncio.to_thread(apply_all)
    except asyncio.CancelledError:
        halt.set()
        raise
    for fetched, outcome in zip(batch, outcomes, strict=False):
        with logs.bound(page=fetched.request.label):
            _applied(job, fetched, outcome, on_page)
    if failure is not None:
        raise failure
    if stopped:
        raise StopRequested


async def _apply(
    job: Job, run_id: int, fetched: Fetched, *, source: PageSource, sink: PageSink,
    clock: Clock, on_page: PageHook | None,
) -> None:
    """apply (one transaction: records, rejections, counters, checkpoint) → acknowledge."""
    outcome = await asyncio.to_thread(_store, job, run_id, fetched, sink=sink, clock=clock)
    _applied(job, fetched, outcome, on_page)
    await _acknowledge(job, run_id, fetched.request, fetched.page, source=source, sink=sink)


def _store(job: Job, run_id: int, fetched: Fetched, *, sink: PageSink,
           clock: Clock) -> PageOutcome:
    """One page's transaction: records, rejections, counters, checkpoint (blocking)."""
    page = fetched.page
    return sink.apply_page(
        run_id=run_id, tenant=job.tenant.id, scope=job.scope, page=fetched.request.label,
        accepted=page.accepted, rejections=page.rejections,
        checkpoint=pagination.checkpoint_after(fetched.following), normalised=page.normalised,
        now=clock.now(), rows=page.rows,
    )


def _applied(job: Job, fetched: Fetched, outcome: PageOutcome, on_page: PageHook | None) -> None:
    logs.get_logger().debug("page_applied", records=fetched.records, applied=outcome.applied,
                            stale=outcome.stale, rejected=len(fetched.page.rejections))
    if on_page is not None:
        on_page(job, outcome)


async def _acknowledge(
    job: Job, run_id: int, request: PageRequest, page: ValidatedPage, *,
    source: PageSource, sink: PageSink,
) -> None:
    if job.callback.commit_url is None:
        return
    ack = Ack(run_id=run_id, request=request, accepted=page.accepted_count,
              rejected=len(page.rejections))
    try:
        await source.acknowledge(ack)
    except errors.AckError as exc:
        # SPEC §1: a failed acknowledgement is reported and never rolls back stored data.
        logs.get_logger().warning("ack_failed", error=str(exc))
        await asyncio.to_thread(sink.count_failed_ack, run_id)
