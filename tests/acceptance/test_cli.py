"""The `puller` command as a subprocess: exit codes, summary, status, SIGKILL/SIGTERM + resume."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
import yaml

from puller import records, schema
from puller.domain import Scope
from puller.tenant_server import Dataset, Fault, TenantServer, cursor_offset
from tests.conftest import add_dataset

SCOPE_TABLES = {"customer": schema.customers, "order": schema.orders, "product": schema.products}


def write_config(tmp_path: Path, server: TenantServer, tenant: str, *, store_url: str,
                 scopes: dict[str, dict[str, Any]], **tenant_over: Any) -> Path:
    path = tmp_path / "puller.yaml"
    path.write_text(yaml.safe_dump({
        "store": store_url, "allow_private_networks": True,
        "retry": {"attempts": 2, "initial_wait": "0.01s", "max_wait": "0.02s"},
        "tenants": [{"id": tenant, "shop": f"{tenant}.example.com", **tenant_over,
                     "callbacks": {s: {"url": f"{server.url}/{tenant}/{s}s", **over}
                                   for s, over in scopes.items()}}],
    }))
    return path


def puller(*args: str, env: dict[str, str] | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "puller", *args], capture_output=True,
                          text=True, timeout=timeout, env=_env(env), check=False)


def kill_pull_after(config: Path, seconds: float, *, server: TenantServer,
                    tenant: str, options: Sequence[str] = ()) -> None:
    """Start `puller pull --config CONFIG [OPTIONS]` and SIGKILL it `seconds` after its
    first request reaches the tenant: counted from there, not from the start, because
    interpreter start-up alone varies from 0.3 to 2 s between machines and moments."""
    before = _requests_of(server, tenant)
    proc = subprocess.Popen([sys.executable, "-m", "puller", "pull", "--config", str(config),
                             *options],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + 60
    while (_requests_of(server, tenant) == before and proc.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.005)
    time.sleep(seconds)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _requests_of(server: TenantServer, tenant: str) -> int:
    return sum(1 for path, _, _ in server.requests if path.startswith(f"/{tenant}/"))


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PULLER_")}
    return {**env, **(extra or {})}


def stored(store_url: str, scope: str, tenant: str) -> dict[str, dict[str, Any]]:
    table = SCOPE_TABLES[scope]
    engine = sa.create_engine(store_url)
    try:
        with engine.connect() as conn:
            result = conn.execute(sa.select(table).where(table.c.tenant_id == tenant))
            return {r._mapping[f"{scope}_id"]: dict(r._mapping) for r in result}
    finally:
        engine.dispose()


def runs(store_url: str, tenant: str) -> list[dict[str, Any]]:
    """The runs of a tenant, oldest first; none while the process has not created tables."""
    engine = sa.create_engine(store_url)
    try:
        with engine.connect() as conn:
            result = conn.execute(sa.select(schema.runs).where(schema.runs.c.tenant_id == tenant)
                                  .order_by(schema.runs.c.id))
            return [dict(r._mapping) for r in result]
    except sa.exc.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        engine.dispose()


def assert_store_equals_source(store_url: str, tenant: str, data: Dataset, scope: str) -> None:
    """Every valid source record is stored once, as its newest version; nothing else is."""
    page = records.validate_page(Scope(scope), data.records[scope])
    expected = {r.record_id: r for r in page.accepted}
    got = stored(store_url, scope, tenant)
    assert set(got) == set(expected)
    for record_id, record in expected.items():
        assert got[record_id]["last_modified_date"] == record.last_modified_at
        for column, value in record.columns.items():
            assert got[record_id][column] == value, (record_id, column)


def test_exit_0_and_summary_on_success(tenant_server: TenantServer, tenant_id: str,
                                       tmp_path: Path) -> None:
    """All runs succeed (rejections do not fail a run): exit 0 and a per-run summary."""
    data = add_dataset(tenant_server, tenant_id, customers=60, products=20, orders=30,
                       invalid_every=10)
    store_url = f"sqlite:///{tmp_path}/var/p.db"
    config = write_config(tmp_path, tenant_server, tenant_id, store_url=store_url,
                          scopes={"customer": {"page_size": 25}, "product": {},
                                  "order": {"pagination": "cursor"}})
    done = puller("pull", "--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    summary = orjson.loads(done.stdout)
    assert [(r["scope"], r["status"]) for r in summary] == [
        ("customer", "succeeded"), ("product", "succeeded"), ("order", "succeeded")]
    assert (summary[0]["pages"], summary[0]["accepted"], summary[0]["rejected"]) == (3, 54, 6)
    assert {"stale", "duration_s"} <= set(summary[0])
    events = [orjson.loads(line) for line in done.stderr.splitlines() if line.strip()]
    finished = [e for e in events if e["event"] == "run_succeeded"]
    assert {(e["tenant"], e["scope"]) for e in finished} == {
        (tenant_id, "customer"), (tenant_id, "product"), (tenant_id, "order")}
    assert all(isinstance(e["run_id"], int) and e["level"] == "info" for e in finished)
    for scope in ("customer", "product", "order"):
        assert_store_equals_source(store_url, tenant_id, data, scope)
    table = puller("pull", "--config", str(config), "--scope", "customer")
    assert table.returncode == 0 and "succeeded" in table.stdout and "stale" in table.stdout


def test_exit_1_when_a_run_fails(tenant_server: TenantServer, tenant_id: str,
                                 tmp_path: Path) -> None:
    """A failed run gives exit 1, and its error is printed with what to do."""
    add_dataset(tenant_server, tenant_id, customers=5)
    tenant_server.fail_next(tenant_id, "customers", Fault(status=404))
    config = write_config(tmp_path, tenant_server, tenant_id,
                          store_url=f"sqlite:///{tmp_path}/p.db", scopes={"customer": {}})
    done = puller("pull", "--config", str(config))
    assert done.returncode == 1
    assert "HTTP 404 from POST" in done.stdout and "check the URL" in done.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(["pull", "--config", "/nonexistent.yaml"], "cannot read the file"),
     (["pull", "--config", "{config}", "--tenant", "nobody"], "no tenant 'nobody'"),
     (["pull", "--config", "{config}", "--scope", "invoices"], "unknown scope 'invoices'"),
     (["pull", "--config", "{bad}"], "tenants[0].callbacks.customer.page_size"),
     (["pull"], "--config"),
     ([], "usage")],
    ids=["missing-file", "unknown-tenant", "unknown-scope", "invalid-config", "no-config",
         "no-command"],
)
def test_exit_2_on_usage_or_config_error(tenant_server: TenantServer, tmp_path: Path,
                                         args: list[str], fragment: str) -> None:
    """Usage and config errors exit 2 and say what to fix."""
    config = write_config(tmp_path, tenant_server, "x", store_url=f"sqlite:///{tmp_path}/p.db",
                          scopes={"customer": {}})
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("customer:", "customer:\n      page_size: -1"))
    done = puller(*[a.format(config=config, bad=bad) for a in args])
    assert done.returncode == 2, done.stderr
    assert fragment in done.stderr


def test_config_check_validates_without_running(tenant_server: TenantServer,
                                                tmp_path: Path) -> None:
    """`puller config check` says valid (exit 0) or names the key (exit 2)."""
    config = write_config(tmp_path, tenant_server, "x", store_url=f"sqlite:///{tmp_path}/p.db",
                          scopes={"customer": {}}, headers={"X-Api-Key": "${NOT_SET_VAR}"})
    done = puller("config", "check", str(config))
    assert done.returncode == 2 and "NOT_SET_VAR is not set" in done.stderr
    done = puller("config", "check", str(config), env={"NOT_SET_VAR": "v"})
    assert done.returncode == 0 and "valid" in done.stdout


def test_the_command_ends_with_its_code_its_output_and_its_atexit_handlers(
    tenant_server: TenantServer, tmp_path: Path,
) -> None:
    """cli.main ends the process at once (os._exit, no interpreter teardown): the exit code,
    everything printed and the atexit handlers are kept; a thread that is not a daemon
    still gets the interpreter's ending, which waits for it."""
    config = write_config(tmp_path, tenant_server, "x", store_url=f"sqlite:///{tmp_path}/p.db",
                          scopes={"customer": {}}, headers={"X-Api-Key": "${NOT_SET_VAR}"})
    probe = ("import atexit, sys, threading, time; "
             "atexit.register(lambda: print('atexit ran', flush=True)); "
             "from puller import cli; "
             "late = sys.argv.pop(1) == 'late'; "
             "late and threading.Thread(target=lambda: (time.sleep(0.3), print('thread ended', "
             "flush=True))).start(); "
             "cli.main()")

    def main(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", probe, *args], capture_output=True,
                              text=True, timeout=60, env=_env(env), check=False)

    done = main("-", "config", "check", str(config), env={"NOT_SET_VAR": "v"})
    assert (done.returncode, done.stdout.splitlines()) == (0, [
        line for line in done.stdout.splitlines() if "valid" in line] + ["atexit ran"])
    done = main("-", "config", "check", str(config))
    assert done.returncode == 2 and "NOT_SET_VAR is not set" in done.stderr
    assert done.stdout == "atexit ran\n"
    done = main("late", "config", "check", str(config), env={"NOT_SET_VAR": "v"})
    assert done.returncode == 0 and done.stdout.splitlines()[-2:] == ["thread ended",
                                                                    "atexit ran"]


def test_status_shows_runs_without_secrets(tenant_server: TenantServer, tenant_id: str,
                                           tmp_path: Path) -> None:
    """status (table and --json) shows checkpoint and last run, never header values."""
    secret = "sk_status_secret_99"
    data = add_dataset(tenant_server, tenant_id, customers=12)
    data.api_key = secret
    config = write_config(tmp_path, tenant_server, tenant_id,
                          store_url=f"sqlite:///{tmp_path}/p.db", scopes={"customer": {}},
                          headers={"X-Api-Key": "${TENANT_KEY}"})
    env = {"TENANT_KEY": secret}
    assert puller("pull", "--config", str(config), env=env).returncode == 0
    data.api_key = "rotated"
    failed = puller("pull", "--config", str(config), env=env)
    assert failed.returncode == 1
    status = puller("status", "--config", str(config), "--json", env=env)
    assert status.returncode == 0
    (row,) = orjson.loads(status.stdout)
    assert (row["tenant"], row["scope"], row["last_status"]) == (tenant_id, "customer", "failed")
    assert "HTTP 401" in row["error"]
    as_json = puller("pull", "--config", str(config), "--json", env=env)
    for output in (failed.stdout, failed.stderr, status.stdout, as_json.stdout, as_json.stderr,
                   puller("status", "--config", str(config), env=env).stdout):
        assert secret not in output


def _checkpoint_page(store_url: str, tenant: str) -> int:
    """The page number the next run starts at (1 when no checkpoint is stored)."""
    engine = sa.create_engine(store_url)
    try:
        with engine.connect() as conn:
            number = conn.execute(sa.select(schema.checkpoints.c.next_number).where(
                schema.checkpoints.c.tenant_id == tenant)).scalar_one_or_none()
    finally:
        engine.dispose()
    return int(number or 1)


def _wait_for_request(server: TenantServer, tenant: str, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen = [p for p, _, _ in server.requests if p.startswith(f"/{tenant}/")]
        if len(seen) >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"the tenant server never got request {count}")


@pytest.mark.parametrize("mode", ["page", "cursor"])
@pytest.mark.parametrize("kill_before_page", [2, 9])
def test_sigkill_between_pages_then_resume(tenant_server: TenantServer, tenant_id: str,
                                           tmp_path: Path, mode: str,
                                           kill_before_page: int) -> None:
    """SIGKILL while page N is in flight: pages < N are stored, the rerun resumes at N, and the
    store ends equal to the source with nothing lost or applied twice."""
    data = add_dataset(tenant_server, tenant_id, customers=150, invalid_every=7)
    store_url = f"sqlite:///{tmp_path}/p.db"
    config = write_config(tmp_path, tenant_server, tenant_id, store_url=store_url,
                          scopes={"customer": {"page_size": 10, "pagination": mode}})
    tenant_server.fail_next(tenant_id, "customers",
                            *[Fault()] * (kill_before_page - 1), Fault(delay_s=5))
    proc = subprocess.Popen([sys.executable, "-m", "puller", "pull", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    try:
        _wait_for_request(tenant_server, tenant_id, kill_before_page, timeout_s=30)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    # With prefetch, pages before N may still have been in their transaction: the store is
    # exactly the pages before its own checkpoint, whatever the moment of the kill.
    resume_at = _checkpoint_page(store_url, tenant_id)
    assert 1 <= resume_at <= kill_before_page
    assert len(stored(store_url, "customer", tenant_id)) == len(records.validate_page(
        Scope.CUSTOMER, data.records["customer"][:10 * (resume_at - 1)]).accepted)
    tenant_server.requests.clear()
    done = puller("pull", "--config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    first = next(q for p, q, _ in tenant_server.requests if p == f"/{tenant_id}/customers")
    if mode == "page":
        assert first["page"] == str(resume_at)
    else:
        assert cursor_offset(first.get("cursor")) == 10 * (resume_at - 1)
    assert_store_equals_source(store_url, tenant_id, data, "customer")
    history = runs(store_url, tenant_id)
    assert [r["status"] for r in history] == ["abandoned", "succeeded"]
    assert sum(r["pages"] for r in history) == 15
    assert sum(r["stale"] for r in history) == 0, "no page was applied twice"


def test_sigkill_at_random_moments_converges(tenant_server: TenantServer, tenant_id: str,
                                             tmp_path: Path) -> None:
    """Kill the pull at seeded random moments, repeatedly; a final run converges exactly."""
    data = add_dataset(tenant_server, tenant_id, customers=400, invalid_every=9)
    data.page_delay_s = 0.03  # ~0.6 s of pages: kills land before, during and after the sweep
    store_url = f"sqlite:///{tmp_path}/p.db"
    config = write_config(tmp_path, tenant_server, tenant_id, store_url=store_url,
                          scopes={"customer": {"page_size": 20, "pagination": "cursor"}})
    chance = random.Random(20261125)
    for _ in range(4):
        kill_pull_after(config, chance.uniform(0.0, 0.9), server=tenant_server, tenant=tenant_id)
    data.page_delay_s = 0.0
    done = puller("pull", "--config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert_store_equals_source(store_url, tenant_id, data, "customer")
    history = runs(store_url, tenant_id)
    assert history[-1]["status"] == "succeeded"
    assert "abandoned" in {r["status"] for r in history}, "at least one kill hit a run"
    # A record is accepted once over all runs: a killed page was never committed, and a
    # re-read of a committed page counts stale, never accepted again.
    assert sum(r["accepted"] for r in history) == len(stored(store_url, "customer", tenant_id))


def test_sigterm_records_the_run_as_interrupted(tenant_server: TenantServer, tenant_id: str,
                                                tmp_path: Path) -> None:
    """SIGTERM on a pull: the in-flight run is recorded interrupted; exit 1; rerun resumes."""
    data = add_dataset(tenant_server, tenant_id, customers=50)
    store_url = f"sqlite:///{tmp_path}/p.db"
    config = write_config(tmp_path, tenant_server, tenant_id, store_url=store_url,
                          scopes={"customer": {"page_size": 10}})
    tenant_server.fail_next(tenant_id, "customers", Fault(), Fault(), Fault(delay_s=3))
    proc = subprocess.Popen([sys.executable, "-m", "puller", "pull", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    _wait_for_request(tenant_server, tenant_id, 3, timeout_s=30)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "interrupted" in err
    (run,) = runs(store_url, tenant_id)
    # With prefetch, page 3 is requested while page 2 may still be committing.
    assert run["status"] == "interrupted" and run["pages"] in (1, 2)
    assert _checkpoint_page(store_url, tenant_id) == run["pages"] + 1
    assert len(stored(store_url, "customer", tenant_id)) == 10 * run["pages"]
    assert puller("pull", "--config", str(config)).returncode == 0
    assert_store_equals_source(store_url, tenant_id, data, "customer")


def test_pull_shows_a_progress_bar_on_a_terminal(tenant_server: TenantServer, tenant_id: str,
                                                 tmp_path: Path) -> None:
    """On a terminal (a pty here) `pull` draws live progress per run; off a terminal it doesn't."""
    import pty

    data = add_dataset(tenant_server, tenant_id, customers=60)
    data.page_delay_s = 0.05
    config = write_config(tmp_path, tenant_server, tenant_id,
                          store_url=f"sqlite:///{tmp_path}/p.db",
                          scopes={"customer": {"page_size": 5}})
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "puller", "pull", "--config", str(config)],
                            stdout=follower, stderr=subprocess.DEVNULL,
                            env=_env({"TERM": "xterm", "COLUMNS": "120"}))
    os.close(follower)
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    proc.wait(timeout=30)
    os.close(leader)
    text = screen.decode("utf-8", "replace")
    assert proc.returncode == 0
    assert f"{tenant_id}/customer" in text and "pages" in text and "records" in text
    piped = puller("pull", "--config", str(config))
    assert "pages ·" not in piped.stdout


def test_a_config_file_readable_by_others_is_warned_about(tenant_server: TenantServer,
                                                          tmp_path: Path) -> None:
    """World-readable config: a warning with the chmod to run; owner/group-only: none."""
    config = write_config(tmp_path, tenant_server, "x", store_url=f"sqlite:///{tmp_path}/p.db",
                          scopes={"customer": {}})
    config.chmod(0o644)
    loud = puller("config", "check", str(config))
    assert loud.returncode == 0
    (event,) = [orjson.loads(line) for line in loud.stderr.splitlines()
                if "config_readable_by_others" in line]
    assert event["level"] == "warning" and "chmod o-rwx" in event["hint"]
    config.chmod(0o640)
    assert "config_readable_by_others" not in puller("config", "check", str(config)).stderr
