"""Database faults: a SQLite file locked by another process, a full disk, PostgreSQL
connections lost mid-run. Nothing half-applied; the next run resumes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from puller import errors, schema
from puller.dberror import BUSY_TIMEOUT_ENV
from puller.domain import Scope
from puller.records import validate_page
from puller.store import Store
from puller.tenant_server import TenantServer
from tests.conftest import add_dataset, config_for
from tests.conftest import pull_one as pull

LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""


@contextlib.contextmanager
def locked(path: str, seconds: float) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, path, str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()


async def test_sqlite_locked_briefly_by_another_process_is_waited_for(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str
) -> None:
    """A lock held for a moment is waited out (busy timeout); the pull succeeds."""
    add_dataset(tenant_server, tenant_id, customers=30)
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"customer": {"page_size": 10}})
    with locked(str(store.engine.url.database), seconds=1.0):
        result = await pull(config, store)
    assert result.status == "succeeded" and store.count_records(tenant_id, Scope.CUSTOMER) == 30


async def test_sqlite_locked_too_long_fails_clearly_and_the_next_run_resumes(
    tenant_server: TenantServer, tenant_id: str, store_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Beyond the busy timeout the run fails saying what holds it; nothing half-applied."""
    monkeypatch.setenv(BUSY_TIMEOUT_ENV, "300")
    add_dataset(tenant_server, tenant_id, customers=30)
    store = Store.open(store_url)
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"customer": {"page_size": 10}})
    try:
        with locked(str(store.engine.url.database), seconds=30), \
                pytest.raises(errors.StoreError) as info:
            await pull(config, store)
        assert "database is locked" in str(info.value)
        assert "another process held a write lock" in str(info.value)
        assert store.count_records(tenant_id, Scope.CUSTOMER) == 0
        result = await pull(config, store)
        assert result.status == "succeeded"
        assert store.count_records(tenant_id, Scope.CUSTOMER) == 30
    finally:
        store.close()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs: a disk that fills up (root only; required under CI)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs for the disk-full test: {done.stderr}")
        pytest.skip(f"needs root to mount a tmpfs (allowed outside CI only): {done.stderr}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


async def test_sqlite_disk_full_fails_clearly_and_leaves_the_store_intact(
    tenant_server: TenantServer, tenant_id: str, tiny_disk: Path
) -> None:
    """A full disk fails the run with what to do; the file passes integrity_check and holds
    exactly the pages before its checkpoint."""
    data = add_dataset(tenant_server, tenant_id, customers=4000)
    store_url = f"sqlite:///{tiny_disk}/puller.db"
    store = Store.open(store_url)
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"customer": {"page_size": 100}})
    try:
        try:
            result = await pull(config, store)
            assert result.status == "failed" and result.error is not None
            error = result.error
        except errors.StoreError as exc:  # the run's own bookkeeping no longer fit
            error = str(exc)
        assert "disk is full" in error and "free space" in error
        checkpoint = store.load_checkpoint(tenant_id, Scope.CUSTOMER)
        stored = store.count_records(tenant_id, Scope.CUSTOMER)
    finally:
        store.close()
    assert 0 < stored < 4000
    expected = len(validate_page(Scope.CUSTOMER, data.records["customer"][
        :100 * (checkpoint.next_number - 1)]).accepted)
    assert stored == expected
    db = sqlite3.connect(f"{tiny_disk}/puller.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        db.close()


def _restart_postgres() -> None:
    clusters = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not clusters or not shutil.which("pg_ctlcluster"):
        if os.environ.get("CI") == "true":
            pytest.fail("cannot restart PostgreSQL here: no pg_ctlcluster cluster")
        pytest.skip("no local pg_ctlcluster cluster to restart (allowed outside CI only)")
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", clusters[-1], "main",
                    "restart"], check=True, capture_output=True, timeout=60)


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
@pytest.mark.parametrize("fault", ["terminate", "restart"])
async def test_postgres_connections_lost_mid_run_then_resume(
    tenant_server: TenantServer, tenant_id: str, store: Store, store_url: str,
    pg_admin: sa.Engine, fault: str,
) -> None:
    """PostgreSQL restarts (or terminates puller's connections) mid-run: the run fails or
    carries on cleanly, nothing is half-applied, the next run finishes, and the store
    equals the source with every record accepted once."""
    data = add_dataset(tenant_server, tenant_id, customers=200)
    data.page_delay_s = 0.03
    config = config_for(tenant_server, tenant_id, store=store_url,
                        scopes={"customer": {"page_size": 10}})
    database = store.engine.url.database

    def cut_when_under_way() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if store.load_checkpoint(tenant_id, Scope.CUSTOMER).next_number >= 5:
                break
            time.sleep(0.02)
        if fault == "restart":
            _restart_postgres()
            return
        with pg_admin.connect() as conn:
            conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE datname = :db AND pid <> pg_backend_pid()"),
                         {"db": database})

    cutter = threading.Thread(target=cut_when_under_way)
    cutter.start()
    try:
        first = await pull(config, store)
    except errors.StoreError:
        first = None  # the cut hit the run's own bookkeeping: the error reached the caller
    await asyncio.to_thread(cutter.join)
    data.page_delay_s = 0.0
    final = await pull(config, store)
    if final.status != "succeeded":  # a run that died mid-way leaves the next to resume
        final = await pull(config, store)
    assert final.status == "succeeded", (first, final)
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(schema.runs).where(
            schema.runs.c.tenant_id == tenant_id)).all()
    assert store.count_records(tenant_id, Scope.CUSTOMER) == 200
    assert sum(r.accepted for r in rows) == 200, "no page applied twice"
