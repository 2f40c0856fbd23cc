"""Triggers and start-up jitter (time is a parameter), and job sync across reloads."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from puller.config import PullerConfig, ScheduleConfig
from puller.domain import Scope
from puller.scheduler import JOB_DEFAULTS, Schedule, trigger_for

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("every", "jitter_s", "latest_s"),
    [("15m", 10.0, 10.0), ("2s", 10.0, 2.0), ("1h", 0.0, 0.0)],
    ids=["jitter-bounded-by-setting", "jitter-bounded-by-interval", "no-jitter"],
)
def test_interval_first_fire_is_spread_within_the_jitter(every: str, jitter_s: float,
                                                         latest_s: float) -> None:
    """The first fire lies in [now, now + min(jitter, interval)]; later fires keep the period."""
    rng = random.Random(7)
    schedule = ScheduleConfig.model_validate({"every": every})
    firsts = []
    for _ in range(50):
        trigger = trigger_for(schedule, now=NOW, jitter_s=jitter_s, rng=rng)
        assert isinstance(trigger, IntervalTrigger)
        first = trigger.get_next_fire_time(None, NOW)
        assert first is not None
        firsts.append((first - NOW).total_seconds())
        second = trigger.get_next_fire_time(first, first)
        assert second is not None
        assert (second - first).total_seconds() == schedule.every_s
    assert min(firsts) >= 0 and max(firsts) <= latest_s
    if latest_s:
        assert len(set(firsts)) > 40, "tenants are spread, not all at one instant"


def test_cron_schedule_fires_on_its_fields_in_utc() -> None:
    """{cron: "*/15 * * * *"} fires at :00, :15, :30, :45 UTC."""
    trigger = trigger_for(ScheduleConfig.model_validate({"cron": "*/15 * * * *"}), now=NOW,
                          jitter_s=0, rng=random.Random(1))
    assert isinstance(trigger, CronTrigger)
    fire = trigger.get_next_fire_time(None, NOW + timedelta(minutes=1))
    assert fire == datetime(2026, 11, 25, 12, 15, tzinfo=UTC)


def test_job_defaults_coalesce_and_never_overlap() -> None:
    """Missed fires coalesce into one; a job never runs twice at once; late fires still run."""
    assert JOB_DEFAULTS == {"coalesce": True, "max_instances": 1, "misfire_grace_time": None}


def _config(*pairs: tuple[str, str, str]) -> PullerConfig:
    tenants: dict[str, dict[str, object]] = {}
    for tenant, scope, every in pairs:
        tenants.setdefault(tenant, {})[scope] = {"url": "https://t.test/x",
                                                 "schedule": {"every": every}}
    return PullerConfig.model_validate({"tenants": [
        {"id": t, "shop": "s", "callbacks": cbs} for t, cbs in tenants.items()]})


async def test_apply_adds_removes_and_reschedules_only_what_changed() -> None:
    """A reload touches only changed jobs: added, removed, rescheduled are counted."""
    due: list[tuple[str, Scope]] = []
    schedule = Schedule(on_due=lambda t, s: due.append((t, s)), on_maintenance=lambda: None,
                        rng=random.Random(3))
    schedule.start(_config(("a", "customer", "1h"), ("b", "order", "1h")), now=NOW)
    try:
        counts = schedule.apply(_config(("a", "customer", "1h"), ("a", "product", "5m"),
                                        ("b", "order", "2h")), now=NOW)
        assert counts == {"added": 1, "removed": 0, "rescheduled": 1}
        counts = schedule.apply(_config(("a", "product", "5m")), now=NOW)
        assert counts == {"added": 0, "removed": 2, "rescheduled": 0}
        assert set(schedule.next_fire_times()) == {"maintenance", "a:product"}
    finally:
        schedule.shutdown()
