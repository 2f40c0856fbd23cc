"""The long-lived worker: dispatch due runs within limits, back off, reload, drain, report."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from puller import client, errors, logs, pipeline
from puller.config import PullerConfig, RetryConfig, TenantConfig
from puller.domain import Checkpoint, PageOutcome, RunResult, Scope
from puller.metrics import Metrics
from puller.scheduler import JobKey, Schedule, period_s
from puller.store import Store

HEARTBEAT_S = 1.0
ConfigLoader = Callable[[], PullerConfig]


@dataclass
class _Slot:
    """What the dispatcher knows of one (tenant, scope)."""

    due: bool = False
    due_since: int = 0
    task: asyncio.Task[None] | None = None
    failures: int = 0
    not_before: float = 0.0
    retired: bool = False


class PageFetcher(Protocol):
    """What the worker asks of a fetch process (fetcher.FetchProcess)."""

    @property
    def ended(self) -> str | None:
        """Why it is gone, or None while it runs."""

    def feed(self, job: pipeline.Job, start: Checkpoint, run_id: int, *,
             retry: RetryConfig | None = None,
             observer: client.RequestObserver | None = None) -> pipeline.PageFeed: ...

    def close(self) -> None:
        """End it (after its runs) and reap it."""


REPLACE_AFTER_S = 60.0
"""A fetch process that died is replaced at once, unless it was itself a replacement that
served less than this long: then after this long (runs fetch in the worker's own process
meanwhile), so that one that dies at every start does not make the worker spin."""


class Heartbeat:
    """Ticks on the event loop; its age tells a thread whether the loop is stuck."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        self._last = self._clock()

    def age_s(self) -> float:
        return self._clock() - self._last


class Worker:
    """Runs every scheduled (tenant, scope) under the global and per-tenant caps."""

    def __init__(self, config: PullerConfig, *, load_config: ConfigLoader, store: Store,
                 http: client.HttpClients, metrics: Metrics | None = None,
                 fetch: PageFetcher | None = None,
                 replace_fetch: Callable[[], PageFetcher] | None = None) -> None:
        """`fetch`: the fetch process that fetches, parses and validates every run's pages
        (`run --fetch-process`); `replace_fetch` starts another when it is gone (without
        it, runs then fetch in this process). The worker closes the last one it had."""
        self.config = config
        self._load_config = load_config
        self._store = store
        self._http = http
        self.metrics = metrics or Metrics()
        self.heartbeat = Heartbeat()
        self._clock = pipeline.SystemClock()
        self._slots: dict[JobKey, _Slot] = {}
        self._due_order = itertools.count()
        # Kept as counts, not recounted from the slots: with thousands of (tenant, scope)
        # pairs due at once, a recount per candidate made each dispatch quadratic.
        self._running: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._stopping = False
        self._schedule = Schedule(on_due=self.mark_due, on_maintenance=self._start_maintenance)
        self._background: set[asyncio.Task[Any]] = set()
        self._log = logs.get_logger()
        self._fetch = fetch
        self._replace_fetch = replace_fetch
        self._fetch_since = time.monotonic()
        self._replaced = False  # whether the fetch process is a replacement
        self._replace_at = 0.0  # monotonic time before which none is started
        self.metrics.fetch_process_up.set(0 if fetch is None else 1)

    async def run(self) -> None:
        """Serve until stop() is called, then drain within shutdown_grace."""
        self._schedule.start(self.config, now=self._clock.now())
        self._log.info("worker_started", tenants=len(self.config.tenants),
                       max_concurrent_runs=self.config.worker.max_concurrent_runs,
                       max_runs_per_tenant=self.config.worker.max_runs_per_tenant)
        beat = asyncio.create_task(self._beat())
        try:
            while not self._stopping:
                await self._wake.wait()
                self._wake.clear()
                self._dispatch()
        finally:
            beat.cancel()
            self._schedule.shutdown()
            await self._drain()
            if self._fetch is not None:
                await asyncio.to_thread(self._fetch.close)

    def stop(self) -> None:
        """Stop starting runs; in-flight runs finish their page and end `interrupted`."""
        if not self._stopping:
            self._stopping = True
            self._log.info("worker_stopping", in_flight=self._in_flight())
        self._wake.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    def mark_due(self, tenant: str, scope: Scope) -> None:
        """Called by the scheduler: this (tenant, scope) should run; repeats coalesce."""
        slot = self._slots.setdefault((tenant, scope), _Slot())
        if not slot.due:
            # Its place in line: the oldest due runs first, so no tenant starves under the cap.
            slot.due, slot.due_since = True, next(self._due_order)
        self._wake.set()

    def reload(self) -> None:
        """Re-read the config; an invalid one is refused and the old one keeps running."""
        try:
            new = self._load_config()
        except errors.PullerError as exc:
            self._log.error("config_reload_failed", error=str(exc),
                            hint="the previous configuration keeps running; fix the file and "
                            "send SIGHUP again")
            return
        for setting in ("store", "allow_private_networks"):
            if getattr(new, setting) != getattr(self.config, setting):
                self._log.warning("config_change_needs_restart", key=setting,
                                  hint=f"a new {setting} takes effect after a restart")
        counts = self._schedule.apply(new, now=self._clock.now())
        kept = {(t.id, s) for t in new.tenants for s in t.callbacks}
        for key, slot in self._slots.items():
            slot.retired = key not in kept
        self.config = new
        self._log.info("config_reloaded", **counts)
        self._wake.set()

    def _dispatch(self) -> None:
        if self._stopping:
            return
        now = time.monotonic()
        waiting = [k for k, s in self._slots.items() if s.due and s.task is None]
        for key in sorted(waiting, key=lambda k: self._slots[k].due_since):
            slot = self._slots[key]
            if slot.retired:
                slot.due = False
                continue
            if now < slot.not_before:
                slot.due = False
                self._log.info("run_skipped_backoff", tenant=key[0], scope=key[1].value,
                               failures=slot.failures, retry_in_s=round(slot.not_before - now, 1))
                continue
            if self._may_start(key):
                slot.due = False
                self._running[key[0]] += 1
                slot.task = asyncio.create_task(self._run(key, slot))

    def _may_start(self, key: JobKey) -> bool:
        tenant, scope = key
        limits = self.config.worker
        if self._in_flight() >= limits.max_concurrent_runs:
            return False
        if self._in_flight(tenant) >= limits.max_runs_per_tenant:
            return False
        if scope is Scope.ORDER:
            # SPEC §4: an order run waits for that tenant's customer and product runs
            # that are running or due at the same time.
            for first in (Scope.CUSTOMER, Scope.PRODUCT):
                other = self._slots.get((tenant, first))
                if other is not None and (other.task is not None or other.due):
                    return False
        return True

    def _in_flight(self, tenant: str | None = None) -> int:
        return self._running.total() if tenant is None else self._running[tenant]

    async def _run(self, key: JobKey, slot: _Slot) -> None:
        tenant_id, scope = key
        self.metrics.in_flight.inc()
        try:
            tenant = self.config.tenant(tenant_id)
            result = await self._sweep(tenant, scope, slot)
            self._record(key, slot, result.status, result.duration_s)
        except Exception as exc:  # the worker never dies because of one tenant
            self._log.exception("run_crashed", tenant=tenant_id, scope=scope.value,
                                error=str(exc))
            self._record(key, slot, "failed", 0.0)
        finally:
            self.metrics.in_flight.dec()
            slot.task = None
            self._running[tenant_id] -= 1
            self._wake.set()

    async def _sweep(self, tenant: TenantConfig, scope: Scope, slot: _Slot) -> RunResult:
        observer = _Observer(self.metrics, {"tenant": tenant.id, "scope": scope.value})
        source = client.CallbackSource(
            self._http.for_tenant(tenant), tenant=tenant, scope=scope,
            callback=tenant.callbacks[scope],
            policy=self.config.retry, observer=observer,
        )
        job = pipeline.Job(tenant=tenant, scope=scope, trigger="schedule")
        return await pipeline.run_sweep(
            job, source=source, sink=self._store, clock=self._clock, on_page=self._count_page,
            should_stop=lambda: self._stopping or slot.retired,
            done_since=self._turn_start(tenant, scope),
            feeds=self._feeds(observer),
        )

    def _feeds(self, observer: _Observer) -> pipeline.FeedFactory | None:
        """Where a run's pages come from: the fetch process while it runs (with the current
        config's retry policy, its requests' failures and retries counted here), else this
        process (none, or one that died and is not replaced yet: _fetching)."""
        fetch = self._fetching()
        if fetch is None:
            return None
        retry = self.config.retry

        def feed(job: pipeline.Job, start: Checkpoint, run_id: int) -> pipeline.PageFeed:
            return fetch.feed(job, start, run_id, retry=retry, observer=observer)
        return feed

    def _fetching(self) -> PageFetcher | None:
        """The fetch process while it runs. One that is gone is said so and replaced: at
        once, unless it was itself a replacement that served less than REPLACE_AFTER_S
        (then after that long); runs fetch in the worker's own process meanwhile, and for
        good without `replace_fetch`."""
        fetch = self._fetch
        if fetch is not None and fetch.ended is None:
            return fetch
        if fetch is not None:
            self._lost(fetch)
        if self._replace_fetch is None or self._stopping or time.monotonic() < self._replace_at:
            return None
        try:
            self._fetch = self._replace_fetch()
        except OSError as exc:
            self._replace_at = time.monotonic() + REPLACE_AFTER_S
            self._log.error("fetch_process_not_started", error=str(exc),
                            hint=f"runs fetch in the worker's own process; it tries again in "
                            f"{REPLACE_AFTER_S:.0f} s")
            return None
        self._fetch_since, self._replaced = time.monotonic(), True
        self.metrics.fetch_process_up.set(1)
        return self._fetch

    def _lost(self, fetch: PageFetcher) -> None:
        self._fetch = None
        self.metrics.fetch_process_up.set(0)
        # Gone already; closing it reaps it and ends its threads once its appliers have
        # applied the pages it sent (each a transaction): in a thread, not on this loop.
        self._in_background(asyncio.to_thread(fetch.close))
        young = self._replaced and time.monotonic() - self._fetch_since < REPLACE_AFTER_S
        self._replace_at = time.monotonic() + (REPLACE_AFTER_S if young else 0.0)
        if self._replace_fetch is None:
            hint = ("runs now fetch in the worker's own process; restart the worker to have "
                    "a fetch process again")
        elif young:
            hint = (f"its replacement died within {REPLACE_AFTER_S:.0f} s too: runs fetch in "
                    f"the worker's own process, and another is started in "
                    f"{REPLACE_AFTER_S:.0f} s")
        else:
            hint = "a new fetch process takes over"
        self._log.error("fetch_process_lost", error=fetch.ended, hint=hint)

    def _turn_start(self, tenant: TenantConfig, scope: Scope) -> datetime | None:
        # With several workers every one fires each job; the first takes the lease and
        # runs, the others skip when a run completed within the last half period.
        schedule = tenant.callbacks[scope].schedule
        if schedule is None:
            return None
        now = self._clock.now()
        return now - timedelta(seconds=period_s(schedule, now=now) / 2)

    def _count_page(self, job: pipeline.Job, outcome: PageOutcome) -> None:
        labels = (job.tenant.id, job.scope.value)
        self.metrics.pages.labels(*labels).inc()
        self.metrics.records.labels(*labels, "accepted").inc(outcome.applied)
        self.metrics.records.labels(*labels, "stale").inc(outcome.stale)
        self.metrics.records.labels(*labels, "rejected").inc(outcome.rejected)

    def _record(self, key: JobKey, slot: _Slot, status: str, duration_s: float) -> None:
        labels = (key[0], key[1].value)
        self.metrics.runs.labels(*labels, status).inc()
        if status == "skipped":
            return
        self.metrics.run_duration.labels(*labels, status).observe(duration_s)
        if status == "succeeded":
            slot.failures, slot.not_before = 0, 0.0
            self.metrics.last_success.labels(*labels).set(time.time())
        elif status == "failed":
            slot.failures += 1
            limits = self.config.worker
            backoff_s = min(limits.failure_backoff_s * 2 ** (slot.failures - 1),
                            limits.max_failure_backoff_s)
            slot.not_before = time.monotonic() + backoff_s
            self._log.warning("tenant_backing_off", tenant=key[0], scope=key[1].value,
                              failures=slot.failures, backoff_s=round(backoff_s, 1))
        self.metrics.consecutive_failures.labels(*labels).set(slot.failures)

    async def _drain(self) -> None:
        tasks = [slot.task for slot in self._slots.values() if slot.task is not None]
        if tasks:
            grace_s = self.config.worker.shutdown_grace_s
            _, late = await asyncio.wait(tasks, timeout=grace_s)
            for task in late:
                task.cancel()
            if late:
                self._log.warning("runs_cancelled_after_grace", runs=len(late), grace_s=grace_s)
                await asyncio.gather(*late, return_exceptions=True)
        for task in list(self._background):
            task.cancel()
        self._log.info("worker_stopped")

    async def _beat(self) -> None:
        while True:
            self.heartbeat.beat()
            self._fetching()  # a fetch process that died while idle shows in the metrics
            await asyncio.sleep(HEARTBEAT_S)

    def _start_maintenance(self) -> None:
        self._in_background(self.maintain(self._clock.now()))

    def _in_background(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run `work` as a task that the worker keeps (asyncio holds only weak references
        to tasks) until it ends, and cancels when it stops."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def maintain(self, now: datetime) -> dict[str, int]:
        """Purge what retention allows (the daily job, and `puller purge`)."""
        retention = self.config.retention
        try:
            removed = await asyncio.to_thread(
                self._store.purge, now=now, soft_deleted_s=retention.soft_deleted_s,
                rejected_s=retention.rejected_s, runs_s=retention.runs_s)
        except errors.StoreError as exc:
            self._log.error("purge_failed", error=str(exc))
            return {}
        self._log.info("purge_finished", **removed)
        return removed


class _Observer:
    def __init__(self, metrics: Metrics, labels: dict[str, str]) -> None:
        self._metrics = metrics
        self._labels = labels

    def request_failed(self, status: str) -> None:
        self._metrics.http_errors.labels(**self._labels, status=status).inc()

    def request_retried(self) -> None:
        self._metrics.retries.labels(**self._labels).inc()
