"""One (tenant, scope) sweep as a loop over ports, and pulling many in SPEC §4 import order."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from puller import applying, errors, logs
from puller.applying import (
    FeedFactory,
    PageFeed,
    PageHook,
    PageSink,
    PushFeed,
    Step,
    StopCheck,
    applied_in_thread,
)
from puller.domain import (
    Clock,
    RunResult,
    RunStatus,
    import_waves,
)
from puller.prefetch import Fetched, Job, PageSource

# Job, Fetched and PageSource are prefetch's, the ports and feeds applying's, which need
# them too; all part of this API.
__all__ = [
    "FeedFactory", "Fetched", "Job", "PageFeed", "PageHook", "PageSink", "PageSource",
    "PushFeed", "RunOne", "Step", "StopCheck", "SystemClock", "applied_in_thread",
    "internal_error", "run_all", "run_event_loop", "run_sweep", "run_tenant",
]

T = TypeVar("T")


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


async def run_sweep(
    job: Job, *, source: PageSource, sink: PageSink, clock: Clock,
    on_page: PageHook | None = None, should_stop: StopCheck | None = None,
    done_since: datetime | None = None, feeds: FeedFactory | None = None,
) -> RunResult:
    """Pull one (tenant, scope) under its lease, from its checkpoint to the end of the sweep.

    Skipped (no run row) when another process holds the lease, or when a run that began
    after `done_since` already completed (another worker took this period's turn).
    `should_stop` is asked after every committed page: a graceful shutdown lets the page in
    flight finish its transaction, then ends the run as `interrupted`. It may be asked from
    the thread that applies pages (applying.sweep): it must only read a flag. `feeds`
    fetches elsewhere (fetcher.FetchProcess); by default a task of this loop fetches
    (prefetch.LocalFeed).
    """
    lease = sink.lease(job.tenant.id, job.scope)

    async def release(held: bool) -> None:
        if held:
            await asyncio.to_thread(lease.__exit__, None, None, None)

    held = await _in_thread_undone_if_cancelled(lease.__enter__, undo=release)
    try:
        if not held:
            return _skipped(job, "another process is pulling this tenant and scope right now")
        if done_since is not None:
            last = await asyncio.to_thread(sink.last_completed_start, job.tenant.id, job.scope)
            if last is not None and last >= done_since:
                return _skipped(job, f"another worker already pulled it at {last:%H:%M:%S}")
        return await _leased_sweep(job, source=source, sink=sink, clock=clock,
                                   on_page=on_page, should_stop=should_stop, feeds=feeds)
    finally:
        await asyncio.shield(asyncio.to_thread(lease.__exit__, None, None, None))


def _skipped(job: Job, reason: str) -> RunResult:
    logs.get_logger().info("run_skipped", tenant=job.tenant.id, scope=job.scope.value,
                           reason=reason)
    return RunResult(run_id=0, tenant=job.tenant.id, scope=job.scope, status="skipped",
                     error=f"skipped: {reason}")


async def _leased_sweep(
    job: Job, *, source: PageSource, sink: PageSink, clock: Clock,
    on_page: PageHook | None, should_stop: StopCheck | None, feeds: FeedFactory | None,
) -> RunResult:
    log = logs.get_logger()
    started = clock.monotonic()
    tenant, scope = job.tenant.id, job.scope

    async def interrupted(run_id: int) -> None:
        await asyncio.to_thread(sink.finish_run, run_id, status="interrupted", now=clock.now(),
                                error=_INTERRUPTED)
        log.warning("run_interrupted", tenant=tenant, scope=scope.value, run_id=run_id)

    run_id = await _in_thread_undone_if_cancelled(functools.partial(
        sink.start_run, tenant, scope, trigger=job.trigger, now=clock.now()), undo=interrupted)
    status: RunStatus = "succeeded"
    error: str | None = None
    with logs.bound(tenant=tenant, scope=scope.value, run_id=run_id):
        log.info("run_started", trigger=job.trigger)
        try:
            await applying.sweep(job, run_id, source=source, sink=sink, clock=clock,
                                 on_page=on_page, should_stop=should_stop, feeds=feeds)
        except applying.StopRequested:
            status, error = "interrupted", _INTERRUPTED
        except errors.PullerError as exc:
            status, error = "failed", str(exc)
        except Exception as exc:
            # A defect, not a tenant's or the database's fault: the run is recorded as
            # failed with the traceback in the log, and the worker carries on.
            log.exception("run_crashed")
            status, error = "failed", internal_error(exc)
        except asyncio.CancelledError:
            # Shielded so an interrupted run is recorded as such before the task ends.
            await asyncio.shield(interrupted(run_id))
            raise
        return await _finished(job, run_id, sink=sink, clock=clock, started=started,
                               status=status, error=error)


async def _finished(job: Job, run_id: int, *, sink: PageSink, clock: Clock, started: float,
                    status: RunStatus, error: str | None) -> RunResult:
    """The run's row finished with `status`, its outcome logged and returned."""
    log = logs.get_logger()
    stats = await asyncio.to_thread(sink.finish_run, run_id, status=status, now=clock.now(),
                                    error=error)
    duration_s = clock.monotonic() - started
    event = {"succeeded": log.info, "interrupted": log.warning}.get(status, log.error)
    event(f"run_{status}", pages=stats.pages, accepted=stats.accepted,
          rejected=stats.rejected, stale=stats.stale, normalised=stats.normalised,
          acks_failed=stats.acks_failed, duration_s=round(duration_s, 3), error=error)
    return RunResult(run_id=run_id, tenant=job.tenant.id, scope=job.scope, status=status,
                     stats=stats, duration_s=duration_s, error=error)


_INTERRUPTED = "interrupted (shutdown or signal); the next run resumes at the checkpoint"


async def _in_thread_undone_if_cancelled(call: Callable[[], T],
                                         undo: Callable[[T], Awaitable[None]]) -> T:
    """`call()` in a thread. Cancelled meanwhile, the thread still finishes (a lease taken,
    a run row written), so its result is undone (`undo`) before the cancellation goes on:
    a run started as SIGTERM came stayed `running` in the store."""
    done = asyncio.ensure_future(asyncio.to_thread(call))
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        try:
            result = await done
        except Exception:  # it did nothing to undo; the cancellation goes on
            raise asyncio.CancelledError from None
        await undo(result)
        raise


def internal_error(exc: BaseException) -> str:
    """A failed run's error for a defect in puller (its traceback is in the log)."""
    return (f"internal error {type(exc).__name__}: {exc} — please report it with the log; "
            "the next run resumes")


RunOne = Callable[[Job], Awaitable[RunResult]]


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run an async entry point on uvloop where it is installed (Linux, macOS): its event
    loop cut a pull's time by ~10% in scripts/bench; plain asyncio elsewhere. The CLI's
    commands and the fetch process (fetch_serve.py) run theirs through it."""
    try:
        import uvloop  # noqa: PLC0415 - optional; absent on Windows
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def run_tenant(jobs: Sequence[Job], run_one: RunOne) -> list[RunResult]:
    """Run one tenant's jobs in import waves: customer and product together, then order."""
    by_scope = {job.scope: job for job in jobs}
    results: list[RunResult] = []
    for wave in import_waves(by_scope):
        results.extend(await _all_of([run_one(by_scope[s]) for s in wave]))
    return results


async def _all_of(awaitables: Sequence[Awaitable[T]]) -> list[T]:
    """Their results, run concurrently; an exception (a cancellation too) is raised once
    every one has ended. asyncio.gather passed the first one on at once: on SIGTERM the
    command then ended while other sweeps were still recording their runs as interrupted,
    and the event loop's teardown cancelled that, leaving the runs `running`."""
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]  # no exception among them


async def run_all(jobs: Sequence[Job], run_one: RunOne, *, max_concurrent: int) -> list[RunResult]:
    """Run every tenant's jobs, tenants concurrently (bounded), each tenant in import order."""
    gate = asyncio.Semaphore(max_concurrent)

    async def gated(job: Job) -> RunResult:
        async with gate:
            return await run_one(job)

    tenants: dict[str, list[Job]] = {}
    for job in jobs:
        tenants.setdefault(job.tenant.id, []).append(job)
    nested = await _all_of([run_tenant(group, gated) for group in tenants.values()])
    return [result for group in nested for result in group]
