"""`puller pull --fetch-process`: pages fetched in a second process, as subprocesses."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa
import yaml

from puller import migration, schema
from puller.store import create_store_engine
from puller.tenant_server import Dataset, Fault, TenantServer, make_customer, timestamp
from tests.acceptance.test_cli import _env, _wait_for_request, assert_store_equals_source, runs
from tests.acceptance.test_processes import (
    SCOPES,
    assert_each_tenant_stored_in_import_order,
    datasets,
    write_many,
)
from tests.conftest import BACKENDS, add_dataset, nested_arrays


def pull(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "puller", "pull", "--fetch-process", *args],
                          capture_output=True, text=True, timeout=120, env=_env(), check=False)


def start_pull(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "puller", "pull", "--fetch-process",
                             "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())


def fetch_pid(stderr: Iterable[str]) -> int:
    """The fetch process's pid, from the main process's `fetch_process_started` log line."""
    for line in stderr:
        if '"fetch_process_started"' in line:
            pid: int = orjson.loads(line)["pid"]
            return pid
    raise AssertionError("no fetch_process_started log line")


def gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def with_acks(config: Path, server: TenantServer, **over: object) -> Path:
    doc = yaml.safe_load(config.read_text())
    for tenant in doc["tenants"]:
        for callback in tenant["callbacks"].values():
            callback.update(commit_url=f"{server.url}/{tenant['id']}/commit", **over)
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return config


def pull_all_succeeds(config: Path, data: dict[str, Dataset], store_url: str,
                      *options: str) -> None:
    """Pull every tenant of `data` (invalid records among them): every run succeeds, in
    import order, some records are rejected, and each tenant's store equals its source,
    its orders stored after its customers and products."""
    done = pull("--config", str(config), "--json", *options)
    assert done.returncode == 0, done.stderr
    summary = orjson.loads(done.stdout)
    assert [(r["tenant"], r["scope"]) for r in summary] == [(t, s) for t in data for s in SCOPES]
    assert all(r["status"] == "succeeded" for r in summary)
    assert sum(r["rejected"] for r in summary) > 0
    assert_each_tenant_stored_in_import_order(store_url, data)


@BACKENDS
def test_a_pull_with_a_fetch_process_stores_what_one_without_it_does(
    tenant_server: TenantServer, tenant_id: str, tmp_path: Path, store_url: str,
) -> None:
    """Every scope of several tenants, invalid records among them (their rejections cross
    the pipe too), acknowledged: every run succeeds, the store equals the source, orders
    after their customers and products, one ack per page, and the acks count the records
    accepted (applied or stale) and rejected, though the records crossed as store rows."""
    data = datasets(tenant_server, tenant_id, 3)
    config = with_acks(write_many(tmp_path, tenant_server, list(data), store_url=store_url),
                       tenant_server)
    pull_all_succeeds(config, data, store_url)
    for tenant in data:
        acks = [a for a in tenant_server.acks if a["tenant"] == tenant]
        stored = runs(store_url, tenant)
        assert len(acks) == sum(r["pages"] for r in stored)
        assert sum(a["accepted"] for a in acks) == sum(r["accepted"] + r["stale"] for r in stored)
        assert sum(a["rejected"] for a in acks) == sum(r["rejected"] for r in stored) > 0


@BACKENDS
@pytest.mark.parametrize("concurrency", [1, 3])
def test_pages_applied_as_they_come_keep_each_runs_order_and_count(
    tenant_server: TenantServer, tenant_id: str, tmp_path: Path, store_url: str,
    concurrency: int,
) -> None:
    """Without a commit_url the pages of every run go to shared applier threads (one on
    SQLite; on PostgreSQL one per concurrent run, at most one per core: on two cores, 3
    runs at once share two): several tenants' runs at once, invalid
    records among them, each run's pages applied in order and counted, the store equal to
    the source, orders after their customers and products."""
    data = datasets(tenant_server, tenant_id, 4)
    config = write_many(tmp_path, tenant_server, list(data), store_url=store_url)
    pull_all_succeeds(config, data, store_url, "--concurrency", str(concurrency))


def test_it_combines_with_processes(tenant_server: TenantServer, tenant_id: str,
                                    tmp_path: Path) -> None:
    data = datasets(tenant_server, tenant_id, 4)
    store_url = f"sqlite:///{tmp_path}/p.db"
    config = write_many(tmp_path, tenant_server, list(data), store_url=store_url)
    done = pull("--config", str(config), "--processes", "2")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count('"fetch_process_started"') == 2
    assert_each_tenant_stored_in_import_order(store_url, data)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_no_page_is_fetched_more_than_prefetch_ahead_of_its_acknowledgement(
    tenant_server: TenantServer, tenant_id: str, tmp_path: Path, prefetch: int,
) -> None:
    """The fetch process asks for page N + prefetch + 1 only after page N was applied and
    acknowledged: at every point of the tenant's request log, the page requests exceed
    the acks by at most prefetch + 1 (with 0: strict alternation)."""
    data = datasets(tenant_server, tenant_id, 1)
    tenant = next(iter(data))
    config = with_acks(write_many(tmp_path, tenant_server, [tenant],
                                  store_url=f"sqlite:///{tmp_path}/p.db", page_size=3),
                       tenant_server, prefetch=prefetch)
    done = pull("--config", str(config), "--scope", "customer")
    assert done.returncode == 0, done.stderr
    ahead, most = 0, 0
    for path, _, _ in tenant_server.requests:
        if path == f"/{tenant}/customers":
            ahead += 1
        elif path == f"/{tenant}/commit":
            ahead -= 1
        most = max(most, ahead)
    assert ahead == 0 and most == prefetch + 1
    assert_store_equals_source(f"sqlite:///{tmp_path}/p.db", tenant, data[tenant], "customer")


@pytest.mark.parametrize(("fault", "message"), [
    (Fault(status=404), "HTTP 404 from POST /{tenant}/customers"),
    (Fault(body=b"<html>oops</html>"), "response is not JSON"),
])
def test_a_failure_while_fetching_fails_the_run_with_its_own_message(
    tenant_server: TenantServer, tenant_id: str, tmp_path: Path, fault: Fault, message: str,
) -> None:
    data = datasets(tenant_server, tenant_id, 2)
    failing, other = list(data)
    tenant_server.fail_next(failing, "customers", Fault(), fault)
    config = write_many(tmp_path, tenant_server, list(data),
                        store_url=f"sqlite:///{tmp_path}/p.db")
    done = pull("--config", str(config))
    assert done.returncode == 1
    assert re.search(rf"run \d+ \({failing}/customer\): tenant {failing}, scope customer, "
                     "page 2: ", done.stdout), done.stdout
    assert message.format(tenant=failing) in done.stdout
    statuses = {(r["tenant_id"], r["scope"]): r["status"]
                for t in data for r in runs(f"sqlite:///{tmp_path}/p.db", t)}
    assert statuses[(failing, "customer")] == "failed"
    assert all(statuses[(other, s)] == "succeeded" for s in SCOPES)


@dataclass
class Stalled:
    """A pull whose tenant holds its second customer page for 3 s, and its fetch process."""

    proc: subprocess.Popen[str]
    fetch_pid: int
    tenant: str
    dataset: Dataset
    store_url: str
    config: Path

    def assert_a_rerun_converges(self) -> None:
        assert pull("--config", str(self.config)).returncode == 0
        for scope in SCOPES:
            assert_store_equals_source(self.store_url, self.tenant, self.dataset, scope)


def stalled_pull(server: TenantServer, tenant_id: str, tmp_path: Path) -> Stalled:
    tenant, dataset = next(iter(datasets(server, tenant_id, 1).items()))
    server.fail_next(tenant, "customers", Fault(), Fault(delay_s=3))
    store_url = f"sqlite:///{tmp_path}/p.db"
    config = write_many(tmp_path, server, [tenant], store_url=store_url)
    proc = start_pull(config)
    assert proc.stderr is not None
    pid = fetch_pid(proc.stderr)
    _wait_for_request(server, tenant, 2, timeout_s=30)
    return Stalled(proc, pid, tenant, dataset, store_url, config)


def test_sigterm_interrupts_the_runs_and_ends_the_fetch_process(
    tenant_server: TenantServer, tenant_id: str, tmp_path: Path,
) -> None:
    stalled = stalled_pull(tenant_server, tenant_id, tmp_path)
    stalled.proc.send_signal(signal.SIGTERM)
    _, err = stalled.proc.communicate(timeout=30)
    assert stalled.proc.returncode == 1 and "interrupted" in err, err
    assert gone(stalled.fetch_pid, 10)
    status = {r["scope"]: r["status"] for r in runs(stalled.store_url, stalled.tenant)}
    assert status["customer"] == "interrupted"
    stalled.assert_a_rerun_converges()


def test_the_fetch_process_ends_when_the_main_process_is_killed(
    tenant_server: TenantServer, tenant_id: str, tmp_path: Path,
) -> None:
    """SIGKILL leaves no orphan: the fetch process sees its pipe close and exits; the next
    pull resumes at the checkpoint."""
    stalled = stalled_pull(tenant_server, tenant_id, tmp_path)
    stalled.proc.kill()
    stalled.proc.communicate(timeout=30)
    assert gone(stalled.fetch_pid, 10)
    stalled.assert_a_rerun_converges()


def test_a_dead_fetch_process_fails_its_runs_with_what_happened(
    tenant_server: TenantServer, tenant_id: str, tmp_path: Path,
) -> None:
    stalled = stalled_pull(tenant_server, tenant_id, tmp_path)
    os.kill(stalled.fetch_pid, signal.SIGKILL)
    out, _ = stalled.proc.communicate(timeout=30)
    assert stalled.proc.returncode == 1
    assert (f"the fetch process (pid {stalled.fetch_pid}) ended with exit code -9 while this "
            "run was fetching") in out
    assert "pull without --fetch-process if this repeats" in out
    status = {r["scope"]: r["status"] for r in runs(stalled.store_url, stalled.tenant)}
    assert status["customer"] == "failed"
    stalled.assert_a_rerun_converges()


def test_the_main_process_imports_no_http_client_when_it_has_nothing_to_acknowledge(
    tenant_server: TenantServer, tenant_id: str, tmp_path: Path,
) -> None:
    """Without commit_url the fetch process makes every request: the main process does not
    import aiohttp or httpx (~0.1 s of start-up); with commit_url it does, to acknowledge.
    What the main process imported is printed at its exit (the fetch process ends with
    os._exit, which runs no atexit handler)."""
    add_dataset(tenant_server, tenant_id, customers=25, products=0, orders=0)
    store_url = f"sqlite:///{tmp_path}/p.db"
    config = write_many(tmp_path, tenant_server, [tenant_id], store_url=store_url)
    report = ("import atexit, sys; atexit.register(lambda: print('HTTP', 'aiohttp' in "
              "sys.modules, 'httpx' in sys.modules)); from puller import cli; cli.main()")

    def main_imports(path: Path) -> str:
        done = subprocess.run([sys.executable, "-c", report, "pull", "--fetch-process",
                               "--config", str(path)], capture_output=True, text=True,
                              timeout=120, env=_env(), check=False)
        assert done.returncode == 0, done.stderr
        return next(line for line in done.stdout.splitlines() if line.startswith("HTTP"))

    assert main_imports(config) == "HTTP False False"
    assert main_imports(with_acks(config, tenant_server)) == "HTTP True True"
    assert tenant_server.acks


@BACKENDS
def test_the_fetch_process_is_forked_before_sqlalchemy_and_never_imports_it(
    tenant_server: TenantServer, tenant_id: str, tmp_path: Path, store_url: str,
) -> None:
    """The fork comes before the main process opens the store, so the fetch process
    imports its HTTP client meanwhile; no process of a pull imports SQLAlchemy (~0.2 s),
    into SQLite or PostgreSQL.
    An audit hook prints who imports it; a wrapped os.fork prints whether it was imported
    at the fork."""
    add_dataset(tenant_server, tenant_id, customers=25, products=5, orders=5)
    config = write_many(tmp_path, tenant_server, [tenant_id], store_url=store_url)
    probe = (
        "import os, sys; main = os.getpid(); sys.addaudithook(lambda event, args: "
        "event == 'import' and args[0] == 'sqlalchemy' and print('SQLALCHEMY', "
        "'main' if os.getpid() == main else 'fetch', flush=True)); fork = os.fork; "
        "os.fork = lambda: (print('FORK', 'sqlalchemy' in sys.modules, flush=True), "
        "fork())[1]; from puller import cli; cli.main()")
    done = subprocess.run([sys.executable, "-c", probe, "pull", "--fetch-process",
                           "--config", str(config)], capture_output=True, text=True,
                          timeout=120, env=_env(), check=False)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stdout.splitlines() if line.startswith(("FORK", "SQLALCHEMY"))]
    # No process of the pull imports it (sqlite_store.SqliteStore, pg_store.PgStore).
    assert said == ["FORK False"]
    engine = create_store_engine(store_url)
    try:
        with engine.connect() as conn:
            stored = conn.execute(sa.select(sa.func.count()).select_from(schema.customers))
            assert stored.scalar_one() == 25
    finally:
        engine.dispose()


@BACKENDS
def test_customer_pages_stored_straight_from_validation_match_the_long_way(
    tenant_server: TenantServer, tenant_id: str, tmp_path: Path, store_url: str,
) -> None:
    """The fetch process builds a clean customer page's rows straight from validation
    (forms.customer_rows) and sends a page with a repeated id the long way (newest per
    id): an integer id stored as text, an offset time stored in UTC, the extra fields
    kept (an integer beyond 64 bits exact), and the newest of three versions of c1 kept,
    two counted stale."""
    data = add_dataset(tenant_server, tenant_id, customers=0, products=0, orders=0)
    data.records["customer"] = [
        make_customer(1, email="v2@example.com", last_modified_date=timestamp(20)),
        make_customer(1, email="v1@example.com", last_modified_date=timestamp(10)),
        make_customer(1, email="v3@example.com", last_modified_date=timestamp(30)),
        *[make_customer(n) for n in range(2, 9)],
        {**make_customer(42), "customer_id": 42,
         "last_modified_date": "2024-12-01T12:00:00+02:00", "zz_note": [1, {"a": None}]},
        *[make_customer(n) for n in range(50, 55)],
    ]
    data.records["customer"][-5]["zz_points"] = 123456789012345678901234567891  # > 64 bits
    config = write_many(tmp_path, tenant_server, [tenant_id], store_url=store_url)
    done = pull("--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    (customer,) = [r for r in orjson.loads(done.stdout) if r["scope"] == "customer"]
    assert (customer["pages"], customer["accepted"], customer["stale"]) == (2, 14, 2)
    engine = create_store_engine(store_url)
    with engine.connect() as conn:
        stored = {r.customer_id: r for r in conn.execute(sa.select(schema.customers))}
    engine.dispose()
    assert len(stored) == 14 and stored["c1"].email == "v3@example.com"
    assert stored["42"].last_modified_date == datetime(2024, 12, 1, 10, 0, tzinfo=UTC)
    assert stored["42"].extra == {"loyalty_tier": make_customer(42)["loyalty_tier"],
                                  "zz_note": [1, {"a": None}]}
    assert stored["c50"].extra == {"loyalty_tier": make_customer(50)["loyalty_tier"],
                                   "zz_points": 123456789012345678901234567891}


@BACKENDS
@pytest.mark.parametrize(("value", "kept"), [
    (nested_arrays(299), "(not kept: nested more than 200 levels deep)"),
    ("a\x00b", "a\ufffdb"),
], ids=["nested-300-levels", "nul-character"])
def test_a_record_the_store_cannot_hold_is_rejected_by_the_fetch_process(
    tenant_server: TenantServer, tenant_id: str, tmp_path: Path, store_url: str,
    value: object, kept: str,
) -> None:
    """A customer whose extra field nests 300 levels (more than shapes.MAX_DEPTH), or
    holds a NUL character (PostgreSQL cannot store it), leaves the fetch process's
    shortcut for the explaining path and is rejected there; its rejection crosses the
    pipe and is stored, and the run succeeds."""
    data = add_dataset(tenant_server, tenant_id, customers=4, products=0, orders=0)
    data.records["customer"][2]["zz_field"] = value
    config = write_many(tmp_path, tenant_server, [tenant_id], store_url=store_url)
    done = pull("--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    (customer,) = [r for r in orjson.loads(done.stdout) if r["scope"] == "customer"]
    assert (customer["accepted"], customer["rejected"]) == (3, 1)
    engine = create_store_engine(store_url)
    with engine.connect() as conn:
        (record,) = conn.execute(sa.select(schema.rejected_records.c.record)).scalars()
    engine.dispose()
    assert record["customer_id"] == "c2" and record["zz_field"] == kept


def test_a_store_that_cannot_be_opened_fails_the_pull_and_ends_the_fetch_process(
    tenant_server: TenantServer, tenant_id: str, tmp_path: Path,
) -> None:
    """The fetch process is forked before the store opens; a store this puller refuses
    (its schema behind) fails the pull with what to do, and the fetch process ends, having
    fetched nothing."""
    add_dataset(tenant_server, tenant_id, customers=5, products=0, orders=0)
    store_url = f"sqlite:///{tmp_path}/behind.db"
    engine = create_store_engine(store_url)
    with engine.begin() as conn:
        migration.upgrade(conn, "0001")
    engine.dispose()
    config = write_many(tmp_path, tenant_server, [tenant_id], store_url=store_url)
    done = pull("--config", str(config))
    assert done.returncode == 1, done.stderr
    assert "run `puller db upgrade --config PATH`" in done.stderr
    assert gone(fetch_pid(done.stderr.splitlines()), 10)
    assert not [path for path, _, _ in tenant_server.requests if f"/{tenant_id}/" in path]


def test_a_tenant_of_its_own_dataset_is_pulled_in_cursor_mode_too(
    tenant_server: TenantServer, tenant_id: str, tmp_path: Path,
) -> None:
    dataset = add_dataset(tenant_server, tenant_id, customers=47, products=0, orders=0)
    store_url = f"sqlite:///{tmp_path}/p.db"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "store": store_url, "allow_private_networks": True,
        "tenants": [{"id": tenant_id, "shop": f"{tenant_id}.example.com", "callbacks": {
            "customer": {"url": f"{tenant_server.url}/{tenant_id}/customers",
                         "pagination": "cursor", "page_size": 5}}}]}))
    config.chmod(0o600)
    done = pull("--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)[0]["pages"] == 10
    assert_store_equals_source(store_url, tenant_id, dataset, "customer")


@pytest.mark.parametrize("level", ["debug", "info"])
def test_pages_applied_as_they_come_are_logged_at_debug_only(
    tenant_server: TenantServer, tenant_id: str, tmp_path: Path, level: str,
) -> None:
    """A page applied on the applier thread is followed on the event loop only when
    something is done there: at debug, one page_applied event a page, in order, with the
    run's keys; at info none, and the pull is the same."""
    add_dataset(tenant_server, tenant_id, customers=23, products=0, orders=0)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "store": f"sqlite:///{tmp_path}/p.db", "allow_private_networks": True,
        "tenants": [{"id": tenant_id, "shop": f"{tenant_id}.example.com", "callbacks": {
            "customer": {"url": f"{tenant_server.url}/{tenant_id}/customers",
                         "page_size": 10}}}]}))
    config.chmod(0o600)
    done = subprocess.run(
        [sys.executable, "-m", "puller", "--log-level", level, "--log-json", "pull",
         "--fetch-process", "--config", str(config), "--json"],
        capture_output=True, text=True, timeout=120, env=_env(), check=False)
    assert done.returncode == 0, done.stderr
    (summary,) = orjson.loads(done.stdout)
    assert (summary["pages"], summary["accepted"]) == (3, 23)
    events = [orjson.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    applied = [e for e in events if e["event"] == "page_applied"]
    if level == "info":
        assert applied == []
        assert any(e["event"] == "run_succeeded" for e in events)
        return
    assert [(e["tenant"], e["scope"], e["run_id"], e["page"], e["records"]) for e in applied] \
        == [(tenant_id, "customer", summary["run_id"], str(n), r)
            for n, r in ((1, 10), (2, 10), (3, 3))]
