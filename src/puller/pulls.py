"""A one-off pull's parts, for `puller pull` (cli) and the tests: its store (without
SQLAlchemy where it can), its fetch process and applier threads (`--fetch-process`), the
sweeps run `concurrency` at a time with a progress bar on a terminal, and their summary
rows. cli parses the command, splits a pull among processes (fanout) and maps the
outcome to an exit code."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from puller import pg_store, pipeline, sqlite_store
from puller.config import PullerConfig, dialect_of
from puller.domain import Ack, PageOutcome, PageRequest, RunResult

if TYPE_CHECKING:
    # Imported where they are needed (cli's note): HTTP only where a request is made, the
    # store (SQLAlchemy) only after a fetch process is forked.
    from puller import client, fetcher
    from puller.store import Store


def start_fetch_process(config: PullerConfig, jobs: Sequence[pipeline.Job], *,
                        concurrency: int, worker: bool = False) -> fetcher.FetchProcess:
    """`--fetch-process`: forked before the event loop and the store's connections."""
    from puller import fetcher  # noqa: PLC0415 - lazy, as client

    dialect = dialect_of(config.store)
    return fetcher.FetchProcess.start(jobs, config, dialect=dialect,
                                      appliers=appliers(dialect, concurrency), worker=worker)


def appliers(dialect: str, concurrency: int) -> int:
    """The threads that apply `--fetch-process` pages: one on SQLite, which takes one
    writer at a time; on PostgreSQL one per concurrent sweep, at most one more than the
    cores (a page is written on its run's lease connection). The pages of every sweep come
    from one fetch process, which keeps one core busy; while one applier's statement waits
    for the server's commit (its fsync), another's runs, but many more statements at once
    than cores only contend for them, in this process (GIL hand-offs among the threads)
    and in a server on the same machine. 100 tenants x 2,000 customers, --concurrency 8,
    two cores, six interleaved A/B sets of 3-7 rounds on 2026-11-27: the median pull 1-13%
    shorter with 2 appliers than with 8 in each (page size 50: 5.94 -> 5.19, 6.18 -> 5.52,
    5.82 -> 5.13, 5.15 -> 5.10, 6.80 -> 6.55 s; 500: 3.00 -> 2.81 s), the main process's
    CPU 0.2-0.3 s less at page size 50. One applier is no better than two: page size 50, 6
    interleaved rounds (2026-11-27, 16:35), median 9.60 s against 8.25 s with two. Three
    against two (2026-11-28, page size 50): 7.30 against 8.22 s (4 rounds), 7.41 against
    7.69 s (5) and 7.81 against 8.13 s (6, faster in 5), the fetch process's CPU 0.1-0.5 s
    less; page size 500: 4.79 against 4.87 s (4) and 4.46 against 4.54 s (6, faster in
    4). Four, in the same sets: 7.55 and 7.78 s at page size 50, 4.55 s at 500."""
    if dialect == "sqlite":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(concurrency, (cores or 1) + 1))


def pull_jobs(config: PullerConfig, jobs: Sequence[pipeline.Job], *, concurrency: int,
              fetch_process: bool, live: bool = True) -> list[RunResult]:
    """Pull the jobs into the store; with `fetch_process` (`--fetch-process`), through a
    fetch process of their own, closed when the pull ends. It is forked before the store
    is imported and opened: it imports and sets up its HTTP client while this process
    opens the store (importing SQLAlchemy for PostgreSQL)."""
    fetch = start_fetch_process(config, jobs, concurrency=concurrency) if fetch_process else None
    try:
        return _pull_into_store(config, jobs, fetch, concurrency=concurrency, live=live)
    finally:
        if fetch is not None:
            fetch.close()


def _pull_into_store(config: PullerConfig, jobs: Sequence[pipeline.Job],
                    fetch: fetcher.FetchProcess | None, *, concurrency: int,
                    live: bool = True) -> list[RunResult]:
    """Open the store, pull the jobs, close the store."""
    store = open_pull_store(config.store)
    try:
        return pipeline.run_event_loop(pull(
            config, jobs, store, concurrency=concurrency, live=live,
            feeds=None if fetch is None else fetch.feed))
    finally:
        if fetch is not None:
            fetch.stop()  # its sweeps are done: it ends while the store closes
        store.close()


def open_store(url: str, *, check_schema: bool = True) -> Store:
    from puller.store import Store  # noqa: PLC0415 - SQLAlchemy, after any fetch process fork

    return Store.open(url, check_schema=check_schema)


class PullStore(pipeline.PageSink, Protocol):
    """What `puller pull` writes to: store.Store, or sqlite_store.SqliteStore."""

    def close(self) -> None: ...


def open_pull_store(url: str) -> PullStore:
    """The store a pull writes to, without SQLAlchemy (its import was ~0.19 s of the pull's
    start-up): a SQLite file (sqlite_store.py) or a PostgreSQL database (pg_store.py) named
    by a URL without query options; any other through SQLAlchemy (store.Store)."""
    path = sqlite_store.database_path(url)
    if path is not None:
        return sqlite_store.SqliteStore.open(path)
    info = pg_store.conninfo(url)
    if info is not None:
        return pg_store.PgStore.open(info)
    return open_store(url)


async def pull(config: PullerConfig, jobs: Sequence[pipeline.Job], store: pipeline.PageSink, *,
               concurrency: int, live: bool = True,
               feeds: pipeline.FeedFactory | None = None) -> list[RunResult]:
    main_task = asyncio.current_task()
    if main_task is not None:
        # SIGTERM from cron/systemd: cancel like Ctrl-C, so runs are recorded as interrupted.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    if not (live and sys.stdout.isatty()):
        return await pull_now(config, jobs, store, concurrency=concurrency, feeds=feeds)
    from rich.progress import (  # noqa: PLC0415 - rich where it draws (see report.table)
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(SpinnerColumn(), TextColumn("{task.description}"),
                  TextColumn("{task.completed} pages · {task.fields[records]} records"),
                  TimeElapsedColumn(), transient=True) as progress:
        bars = {(j.tenant.id, j.scope): progress.add_task(f"{j.tenant.id}/{j.scope.value}",
                                                          total=None, records=0) for j in jobs}
        seen: dict[int, int] = {}

        def on_page(job: pipeline.Job, outcome: PageOutcome) -> None:
            bar = bars[(job.tenant.id, job.scope)]
            seen[bar] = seen.get(bar, 0) + outcome.applied + outcome.stale + outcome.rejected
            progress.update(bar, advance=1, records=seen[bar])

        return await pull_now(config, jobs, store, concurrency=concurrency, on_page=on_page,
                              feeds=feeds)


async def pull_now(
    config: PullerConfig, jobs: Sequence[pipeline.Job], store: pipeline.PageSink, *,
    concurrency: int,
    sleep: client.Sleep = asyncio.sleep, on_page: pipeline.PageHook | None = None,
    feeds: pipeline.FeedFactory | None = None,
) -> list[RunResult]:
    """Pull the jobs once with a fresh HTTP client; every run's result, failed ones included.
    `feeds`: where pages are fetched (the fetch process); by default in this process."""
    clock = pipeline.SystemClock()
    if feeds is not None and not any(j.callback.commit_url or j.tenant.ca_bundle for j in jobs):
        # Nothing to acknowledge and no CA file to check: this process makes no request, so
        # it neither imports the HTTP client (aiohttp, httpx: ~0.1 s) nor builds a TLS
        # context. A pull of 100k at page size 500 took 8% less in scripts/bench.
        return await pipeline.run_all(jobs, lambda job: pipeline.run_sweep(
            job, source=_NO_REQUESTS, sink=store, clock=clock, on_page=on_page, feeds=feeds),
            max_concurrent=concurrency)
    from puller import client  # noqa: PLC0415 - lazy: only pulls need HTTP

    async with client.HttpClients(allow_private_networks=config.allow_private_networks) as http:
        for job in jobs:  # a bad ca_bundle is a config error before anything runs
            http.for_tenant(job.tenant)

        async def run_one(job: pipeline.Job) -> RunResult:
            source = client.CallbackSource(
                http.for_tenant(job.tenant), tenant=job.tenant, scope=job.scope,
                callback=job.callback,
                policy=config.retry, sleep=sleep,
            )
            return await pipeline.run_sweep(job, source=source, sink=store, clock=clock,
                                            on_page=on_page, feeds=feeds)

        return await pipeline.run_all(jobs, run_one, max_concurrent=concurrency)


class _NoRequests:
    """The PageSource of sweeps whose pages come from the fetch process and that have no
    commit_url: the pipeline asks it for nothing."""

    async def fetch_page(self, request: PageRequest) -> bytes:
        raise AssertionError(f"page {request.label} asked of a sweep fed by the fetch process")

    async def acknowledge(self, ack: Ack) -> None:
        raise AssertionError("an acknowledgement asked of a sweep without commit_url")


_NO_REQUESTS = _NoRequests()


def summary_rows(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    return [
        {"run_id": r.run_id, "tenant": r.tenant, "scope": r.scope.value, "status": r.status,
         "pages": r.stats.pages, "accepted": r.stats.accepted, "rejected": r.stats.rejected,
         "stale": r.stats.stale, "normalised": r.stats.normalised,
         "acks_failed": r.stats.acks_failed, "duration_s": round(r.duration_s, 3),
         "error": r.error}
        for r in results
    ]
