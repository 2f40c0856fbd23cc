"""logs.bound: keys bound for what is logged inside, restored as they were on leaving."""

from __future__ import annotations

import asyncio

import pytest
from structlog.contextvars import clear_contextvars, get_contextvars

from puller import logs


@pytest.fixture(autouse=True)
def _clean_context() -> None:
    clear_contextvars()


def test_keys_are_bound_inside_and_restored_as_they_were_on_leaving() -> None:
    with logs.bound(tenant="acme", scope="customer", run_id=7):
        with logs.bound(page="1"):
            assert get_contextvars() == {"tenant": "acme", "scope": "customer",
                                         "run_id": 7, "page": "1"}
            with logs.bound(page="2", cursor="c2"):
                assert get_contextvars()["page"] == "2"
                assert get_contextvars()["cursor"] == "c2"
            assert get_contextvars() == {"tenant": "acme", "scope": "customer",
                                         "run_id": 7, "page": "1"}
        assert get_contextvars() == {"tenant": "acme", "scope": "customer", "run_id": 7}
    assert get_contextvars() == {}


def test_keys_are_restored_when_the_block_raises() -> None:
    with logs.bound(page="1"):
        with pytest.raises(ValueError), logs.bound(page="2"):
            raise ValueError
        assert get_contextvars() == {"page": "1"}
    assert get_contextvars() == {}


async def test_each_task_sees_its_own_keys_across_awaits() -> None:
    """Sweeps bind their keys in tasks of one event loop: a task's keys hold across its
    awaits, whatever the others bind meanwhile."""
    seen: dict[str, list[object]] = {}

    async def sweep(name: str) -> None:
        with logs.bound(tenant=name):
            for page in range(3):
                with logs.bound(page=str(page)):
                    await asyncio.sleep(0)
                    seen.setdefault(name, []).append(dict(get_contextvars()))
            assert get_contextvars() == {"tenant": name}

    await asyncio.gather(sweep("a"), sweep("b"))
    assert seen == {name: [{"tenant": name, "page": str(p)} for p in range(3)]
                    for name in ("a", "b")}
    assert get_contextvars() == {}
