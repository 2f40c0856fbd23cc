"""The only APScheduler user: each callback's schedule becomes a job that marks it due."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from puller.config import PullerConfig, ScheduleConfig
from puller.domain import Scope

JobKey = tuple[str, Scope]
OnDue = Callable[[str, Scope], None]
MAINTENANCE_JOB = "maintenance"

# Jobs only mark a (tenant, scope) due; the worker's dispatcher decides when it runs.
# coalesce: missed fire times collapse into one; misfire_grace_time None: a late job
# still fires (once) instead of being dropped; max_instances 1: a job never overlaps.
JOB_DEFAULTS = {"coalesce": True, "max_instances": 1, "misfire_grace_time": None}


def trigger_for(
    schedule: ScheduleConfig, *, now: datetime, jitter_s: float, rng: random.Random
) -> IntervalTrigger | CronTrigger:
    """The trigger of a schedule; interval jobs start after a random part of the jitter."""
    if schedule.every_s is not None:
        spread = rng.uniform(0, min(jitter_s, schedule.every_s)) if jitter_s else 0.0
        return IntervalTrigger(seconds=schedule.every_s, start_date=now + timedelta(seconds=spread),
                               timezone=UTC)
    assert schedule.cron is not None
    return CronTrigger.from_crontab(schedule.cron, timezone=UTC)


def period_s(schedule: ScheduleConfig, *, now: datetime) -> float:
    """How long one period of a schedule lasts around `now` (for cron, the next gap)."""
    if schedule.every_s is not None:
        return schedule.every_s
    assert schedule.cron is not None
    trigger = CronTrigger.from_crontab(schedule.cron, timezone=UTC)
    first = trigger.get_next_fire_time(None, now)
    second = trigger.get_next_fire_time(first, first) if first else None
    if first is None or second is None:
        return 0.0
    return float((second - first).total_seconds())


class Schedule:
    """Keeps the scheduler's jobs equal to the config's schedules, across reloads."""

    def __init__(self, *, on_due: OnDue, on_maintenance: Callable[[], None],
                 rng: random.Random | None = None) -> None:
        self._scheduler = AsyncIOScheduler(timezone=UTC, job_defaults=JOB_DEFAULTS)
        self._on_due = on_due
        self._on_maintenance = on_maintenance
        self._rng = rng or random.Random()  # spreading load, not security
        self._installed: dict[JobKey, ScheduleConfig] = {}

    def start(self, config: PullerConfig, *, now: datetime) -> None:
        self._scheduler.start()
        self._scheduler.add_job(self._maintenance, CronTrigger.from_crontab(
            config.worker.maintenance_cron, timezone=UTC), id=MAINTENANCE_JOB)
        self.apply(config, now=now, jitter=True)

    def apply(self, config: PullerConfig, *, now: datetime, jitter: bool = False) -> dict[str, int]:
        """Add new jobs, remove dropped ones, reschedule changed ones; returns the counts."""
        wanted = {
            (tenant.id, scope): callback.schedule
            for tenant in config.tenants for scope, callback in tenant.callbacks.items()
            if callback.schedule is not None
        }
        jitter_s = config.worker.startup_jitter_s if jitter else 0.0
        removed = [key for key in self._installed if key not in wanted]
        for key in removed:
            self._scheduler.remove_job(_job_id(key))
            del self._installed[key]
        added = changed = 0
        for key, schedule in wanted.items():
            if self._installed.get(key) == schedule:
                continue
            if key in self._installed:
                self._scheduler.remove_job(_job_id(key))
                changed += 1
            else:
                added += 1
            trigger = trigger_for(schedule, now=now, jitter_s=jitter_s, rng=self._rng)
            self._scheduler.add_job(self._fire, trigger, args=key, id=_job_id(key))
            self._installed[key] = schedule
        return {"added": added, "removed": len(removed), "rescheduled": changed}

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    async def _fire(self, tenant: str, scope: Scope) -> None:
        self._on_due(tenant, scope)

    async def _maintenance(self) -> None:
        self._on_maintenance()

    def next_fire_times(self) -> dict[str, datetime | None]:
        return {job.id: job.next_run_time for job in self._scheduler.get_jobs()}


def _job_id(key: JobKey) -> str:
    return f"{key[0]}:{key[1].value}"
