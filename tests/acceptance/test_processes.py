"""`puller pull --processes N`: tenants split over child processes, as subprocesses."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import yaml

from puller import fanout
from puller.tenant_server import Dataset, Fault, TenantServer
from tests.acceptance.test_cli import (
    _env,
    _wait_for_request,
    assert_store_equals_source,
    puller,
    runs,
)
from tests.conftest import BACKENDS, add_dataset

SCOPES = ("customer", "product", "order")


def write_many(tmp_path: Path, server: TenantServer, tenants: list[str], *,
               store_url: str, page_size: int = 10) -> Path:
    path = tmp_path / "puller.yaml"
    path.write_text(yaml.safe_dump({
        "store": store_url, "allow_private_networks": True,
        "retry": {"attempts": 2, "initial_wait": "0.01s", "max_wait": "0.02s"},
        "tenants": [{"id": t, "shop": f"{t}.example.com",
                     "callbacks": {s: {"url": f"{server.url}/{t}/{s}s", "page_size": page_size}
                                   for s in SCOPES}} for t in tenants],
    }, sort_keys=False))
    path.chmod(0o600)
    return path


def datasets(server: TenantServer, tenant_id: str, count: int) -> dict[str, Dataset]:
    return {f"{tenant_id}x{n}": add_dataset(server, f"{tenant_id}x{n}", customers=30,
                                            products=10, orders=20, invalid_every=7)
            for n in range(count)}


def assert_each_tenant_stored_in_import_order(store_url: str,
                                              data: dict[str, Dataset]) -> None:
    """Each tenant's store equals its source, its orders run after customers and products."""
    for tenant, dataset in data.items():
        history = runs(store_url, tenant)
        order = next(r for r in history if r["scope"] == "order")
        assert all(r["finished_at"] <= order["started_at"] for r in history
                   if r["scope"] != "order")
        for scope in SCOPES:
            assert_store_equals_source(store_url, tenant, dataset, scope)


def test_shares_keep_a_tenants_scopes_together_round_robin() -> None:
    jobs = [("a", "customer"), ("a", "order"), ("b", "customer"), ("c", "customer"),
            ("c", "product")]
    assert fanout.shares(jobs, 2) == [[("a", "customer"), ("a", "order"), ("c", "customer"),
                                       ("c", "product")], [("b", "customer")]]
    assert fanout.shares(jobs, 8) == [[("a", "customer"), ("a", "order")], [("b", "customer")],
                                      [("c", "customer"), ("c", "product")]]
    assert fanout.shares(jobs, 1) == [jobs]


@BACKENDS
def test_processes_split_the_tenants_and_merge_the_summary(
    tenant_server: TenantServer, tenant_id: str, tmp_path: Path, store_url: str,
) -> None:
    """Every run is summarised in config order; each tenant ran in one of two processes;
    the store equals the source, orders after their customers and products."""
    data = datasets(tenant_server, tenant_id, 4)
    config = write_many(tmp_path, tenant_server, list(data), store_url=store_url)
    done = puller("pull", "--config", str(config), "--processes", "2", "--json")
    assert done.returncode == 0, done.stderr
    summary = orjson.loads(done.stdout)
    assert [(r["tenant"], r["scope"]) for r in summary] == [
        (t, s) for t in data for s in SCOPES]
    assert all(r["status"] == "succeeded" for r in summary)
    workers: dict[str, set[Any]] = {t: {r["worker"] for r in runs(store_url, t)} for t in data}
    assert all(len(w) == 1 for w in workers.values())  # a tenant's scopes stay together
    assert len(set().union(*workers.values())) == 2
    assert_each_tenant_stored_in_import_order(store_url, data)


def test_a_failed_run_in_one_process_gives_exit_1_with_its_error(
    tenant_server: TenantServer, tenant_id: str, tmp_path: Path,
) -> None:
    data = datasets(tenant_server, tenant_id, 3)
    failing = list(data)[1]
    tenant_server.fail_next(failing, "customers", Fault(status=404))
    config = write_many(tmp_path, tenant_server, list(data),
                        store_url=f"sqlite:///{tmp_path}/p.db")
    done = puller("pull", "--config", str(config), "--processes", "3")
    assert done.returncode == 1
    assert f"({failing}/customer): " in done.stdout
    assert f"HTTP 404 from POST /{failing}/customers" in done.stdout
    assert done.stdout.count("succeeded") == 3 * 3 - 1 and "failed" in done.stdout


def test_sigterm_reaches_every_child_once_and_a_rerun_resumes(
    tenant_server: TenantServer, tenant_id: str, tmp_path: Path,
) -> None:
    """SIGTERM on the parent: each child's run in flight is recorded interrupted, exit 1;
    the next pull finishes the work."""
    data = datasets(tenant_server, tenant_id, 2)
    for tenant in data:
        tenant_server.fail_next(tenant, "customers", Fault(), Fault(delay_s=3))
    store_url = f"sqlite:///{tmp_path}/p.db"
    config = write_many(tmp_path, tenant_server, list(data), store_url=store_url)
    proc = subprocess.Popen([sys.executable, "-m", "puller", "pull", "--config", str(config),
                             "--processes", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    for tenant in data:
        _wait_for_request(tenant_server, tenant, 2, timeout_s=30)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "interrupted" in err, err
    for tenant in data:
        status = {run["scope"]: run["status"] for run in runs(store_url, tenant)}
        # Products run beside customers; orders wait for both, so never started.
        assert status["customer"] == "interrupted" and "order" not in status, status
    assert puller("pull", "--config", str(config), "--processes", "2").returncode == 0
    for tenant, dataset in data.items():
        for scope in SCOPES:
            assert_store_equals_source(store_url, tenant, dataset, scope)


def test_processes_must_be_positive(tmp_path: Path) -> None:
    done = puller("pull", "--config", str(tmp_path / "x.yaml"), "--processes", "0")
    assert done.returncode == 2 and "not a positive whole number" in done.stderr
