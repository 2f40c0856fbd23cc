"""Retry classification, Retry-After parsing and the backoff policy."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from puller import errors, retry
from puller.config import RetryConfig

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("status", "verdict"),
    [(200, "ok"), (204, "ok"), (301, "redirect"), (302, "redirect"), (400, "fatal"),
     (401, "fatal"), (403, "fatal"), (404, "fatal"), (408, "transient"), (422, "fatal"),
     (429, "transient"), (500, "transient"), (502, "transient"), (503, "transient"),
     (504, "transient")],
    ids=str,
)
def test_classify_follows_spec_5(status: int, verdict: str) -> None:
    """408/429/5xx are retried, other 4xx are not, redirects are not followed."""
    assert retry.classify(status) == verdict


@pytest.mark.parametrize(
    ("header", "expected"),
    [("7", 7.0), (" 0 ", 0.0), ("Wed, 25 Nov 2026 12:00:30 GMT", 30.0),
     ("Wed, 25 Nov 2026 11:00:00 GMT", 0.0), ("soon", None), ("", None), (None, None),
     ("99999", retry.MAX_RETRY_AFTER_S)],
    ids=["seconds", "zero", "http-date", "date-in-past", "garbage", "empty", "absent", "capped"],
)
def test_retry_after_reads_seconds_and_http_dates(
    header: str | None, expected: float | None
) -> None:
    """Retry-After is delta-seconds or an HTTP-date; garbage is ignored; huge waits capped."""
    assert retry.retry_after_s(header, NOW) == expected


def test_backoff_grows_and_is_capped() -> None:
    """Full jitter: each wait lies in [0, min(max_wait, initial·2^(n-1))]."""
    policy = RetryConfig(attempts=10, initial_wait=1, max_wait=8)
    rng = random.Random(1)
    for attempt, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (9, 8)]:
        waits = [retry.backoff_s(attempt, policy, rng=rng) for _ in range(200)]
        assert min(waits) >= 0 and max(waits) <= ceiling
        assert max(waits) > ceiling / 2


async def test_policy_retries_transient_only_and_honours_retry_after() -> None:
    """Transient errors are retried up to `attempts`, waiting at least Retry-After."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise errors.TransientCallbackError(tenant="t", scope="customer", page="1",
                                                reason="HTTP 429", retry_after_s=5.0)
        return "ok"

    policy = RetryConfig(attempts=5, initial_wait=0.01, max_wait=0.02)
    result = None
    async for attempt in retry.retrying(policy, sleep=sleep):
        with attempt:
            result = await flaky()
    assert result == "ok" and calls == 3
    assert slept == [5.0, 5.0]


async def test_policy_does_not_retry_terminal_errors() -> None:
    """A fatal error is raised at once, without sleeping."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    policy = RetryConfig(attempts=5)
    with pytest.raises(errors.FatalCallbackError):
        async for attempt in retry.retrying(policy, sleep=sleep):
            with attempt:
                raise errors.FatalCallbackError(tenant="t", scope="order", page="2",
                                                reason="HTTP 404")
    assert slept == []

