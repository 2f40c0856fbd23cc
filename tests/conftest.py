"""Shared fixtures: a real tenant server on loopback, real stores (SQLite and PostgreSQL)."""

from __future__ import annotations

import contextlib
import itertools
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
from structlog.testing import capture_logs

from puller import cli, logs, pulls
from puller.config import PullerConfig
from puller.domain import RunResult
from puller.store import Store
from puller.tenant_server import Dataset, TenantServer

PG_ADMIN_URL = os.environ.get(
    "PULLER_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
_ids = itertools.count(1)


@pytest.fixture(autouse=True)
def _clean_puller_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PULLER_* variable from the caller's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("PULLER_") and name != "PULLER_TEST_PG_URL":
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def tenant_server() -> Iterator[TenantServer]:
    server = TenantServer().start()
    yield server
    server.stop()


@pytest.fixture
def tenant_id() -> str:
    """A tenant id no other test uses, so tests share one server without sharing data."""
    return f"t{next(_ids)}"


def _pg_reachable() -> str | None:
    try:
        engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[sa.Engine]:
    problem = _pg_reachable()
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is unreachable under CI: {problem}")
        pytest.skip(f"PostgreSQL unreachable (allowed outside CI only): {problem}")
    engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    yield engine
    engine.dispose()


def _pg_url(database: str) -> str:
    return sa.make_url(PG_ADMIN_URL).set(database=database).render_as_string(hide_password=False)


@pytest.fixture
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """A fresh empty store URL per test: SQLite file or a fresh PostgreSQL database."""
    yield from _fresh_store_url(request, getattr(request, "param", "sqlite"),
                                tmp_path / "puller.db")


@pytest.fixture
def second_store_url(request: pytest.FixtureRequest, tmp_path: Any,
                     store_url: str) -> Iterator[str]:
    """Another fresh empty store on store_url's backend, for tests that compare two."""
    backend = "postgres" if store_url.startswith("postgresql") else "sqlite"
    yield from _fresh_store_url(request, backend, tmp_path / "second.db")


def _fresh_store_url(request: pytest.FixtureRequest, backend: str,
                     sqlite_file: Any) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{sqlite_file}"
        return
    admin: sa.Engine = request.getfixturevalue("pg_admin")
    name = f"puller_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield _pg_url(name)
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


BACKENDS = pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """A real store; teardown asserts no connection was left checked out."""
    opened = Store.open(store_url)
    yield opened
    pool = opened.engine.pool
    checked_out = pool.checkedout() if isinstance(pool, sa.QueuePool) else 0
    checked_out -= opened.kept_connections  # SQLite's writer, held on purpose
    opened.close()
    assert checked_out == 0, f"{checked_out} connections left checked out"


def config_for(
    server: TenantServer, tenant: str, *, store: str, scopes: dict[str, dict[str, Any]],
    shop: str | None = None, **tenant_over: Any,
) -> PullerConfig:
    """A config for one tenant on the loopback server; scopes map name → callback overrides."""
    callbacks = {
        scope: {"url": f"{server.url}/{tenant}/{scope}s", **over} for scope, over in scopes.items()
    }
    return PullerConfig.model_validate({
        "store": store,
        "allow_private_networks": True,
        "retry": {"attempts": 3, "initial_wait": 0.01, "max_wait": 0.05},
        "tenants": [{"id": tenant, "shop": shop or f"{tenant}.example.com",
                     "callbacks": callbacks, **tenant_over}],
    })


def nested_arrays(levels: int) -> list[Any]:
    """`levels` arrays, each inside the one before (a record's depth, for shapes.MAX_DEPTH)."""
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


def add_dataset(server: TenantServer, tenant: str, **counts: Any) -> Dataset:
    return server.add(tenant, Dataset.generate(f"{tenant}.example.com", **counts))


@contextlib.contextmanager
def captured_logs() -> Iterator[list[dict[str, Any]]]:
    """Capture event dicts after puller's own contextvars merge and redaction processors."""
    with capture_logs(processors=[structlog.contextvars.merge_contextvars, logs._redact]) as got:
        yield got


async def pull_runs(config: PullerConfig, store: Store, *, scopes: list[str] | None = None,
                    concurrency: int = 4, sleep: Any = None) -> list[RunResult]:
    """Pull every configured (tenant, scope), or `scopes`, once, as `puller pull` does."""
    jobs = cli.select_jobs(config, [], scopes or [], trigger="test")
    extra = {} if sleep is None else {"sleep": sleep}
    return await pulls.pull_now(config, jobs, store, concurrency=concurrency, **extra)


async def pull_one(config: PullerConfig, store: Store, **kw: Any) -> RunResult:
    """pull_runs for a config with exactly one (tenant, scope)."""
    (result,) = await pull_runs(config, store, concurrency=1, **kw)
    return result
