"""Which failures are retried, how long to wait (honouring Retry-After), the tenacity policy."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Literal, Protocol

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from puller import errors


class RetryPolicy(Protocol):
    """How patiently to retry: satisfied by `config.RetryConfig`."""

    @property
    def attempts(self) -> int: ...

    @property
    def initial_wait_s(self) -> float: ...

    @property
    def max_wait_s(self) -> float: ...


Verdict = Literal["ok", "transient", "fatal", "redirect"]
MAX_RETRY_AFTER_S = 300.0
"""A Retry-After beyond this is capped: the run fails sooner and resumes next time."""


def classify(status: int) -> Verdict:
    """SPEC §5: 408, 429 and 5xx are transient; 3xx are not followed; other 4xx are fatal."""
    if 200 <= status < 300:
        return "ok"
    if status in (408, 429) or status >= 500:
        return "transient"
    if 300 <= status < 400:
        return "redirect"
    return "fatal"


def retry_after_s(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return min(float(text), MAX_RETRY_AFTER_S)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return min(max((when - now).total_seconds(), 0.0), MAX_RETRY_AFTER_S)


def backoff_s(attempt: int, policy: RetryPolicy, *, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, initial·2^(attempt-1))]."""
    ceiling = min(policy.max_wait_s, policy.initial_wait_s * 2 ** (attempt - 1))
    return rng.uniform(0, ceiling)


def retrying(
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], Awaitable[None]],
    rng: random.Random | None = None,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> AsyncRetrying:
    """A tenacity policy: retry `errors.Transient` only, wait max(backoff, Retry-After)."""
    chance = rng or random.Random()  # jitter, not security

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        delay = backoff_s(state.attempt_number, policy, rng=chance)
        hinted = getattr(exc, "retry_after_s", None)
        if hinted is not None:
            delay = max(delay, hinted)
        if on_retry is not None and exc is not None:
            on_retry(exc, delay)
        return delay

    return AsyncRetrying(
        retry=retry_if_exception(lambda exc: isinstance(exc, errors.Transient)),
        stop=stop_after_attempt(policy.attempts),
        wait=wait,
        sleep=sleep,
        reraise=True,
    )
