"""`puller run --fetch-process`: the worker's runs fetched in a second process, as real
processes (signals, a killed fetch process, metrics over HTTP)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml

from puller.tenant_server import Fault, TenantServer
from tests.acceptance.test_cli import _env, assert_store_equals_source, runs
from tests.acceptance.test_fetch_process import fetch_pid, gone
from tests.acceptance.test_worker_cli import wait_for, worker_yaml
from tests.conftest import BACKENDS, add_dataset


def start_worker(config: Path) -> tuple[subprocess.Popen[str], int]:
    """`puller run --fetch-process`, once it serves; and its fetch process's pid."""
    proc = subprocess.Popen([sys.executable, "-m", "puller", "run", "--fetch-process",
                             "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    assert proc.stderr is not None
    pid = fetch_pid(proc.stderr)
    for line in proc.stderr:  # its store opened and its signal handlers installed
        if '"worker_started"' in line:
            return proc, pid
    raise AssertionError(f"the worker ended before it started: {proc.wait()}")


def succeeded(store_url: str, tenant: str) -> int:
    return sum(1 for r in runs(store_url, tenant) if r["status"] == "succeeded")


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, as a service manager sends it: the worker drains and exits 0."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return err


@BACKENDS
def test_a_worker_with_a_fetch_process_stores_what_the_tenants_serve(
    tenant_server: TenantServer, tenant_id: str, tmp_path: Path, store_url: str,
) -> None:
    tenants = [f"{tenant_id}a", f"{tenant_id}b"]
    data = {t: add_dataset(tenant_server, t, customers=120, invalid_every=9) for t in tenants}
    config = worker_yaml(tmp_path / "w.yaml", tenant_server, store_url, tenants, page_size=10)
    proc, pid = start_worker(config)
    try:
        assert _parent_of(pid) == proc.pid
        wait_for(lambda: all(succeeded(store_url, t) >= 2 for t in tenants), timeout_s=60)
    finally:
        err = stop(proc)
    assert gone(pid, 10), "the fetch process ends with the worker"
    assert "fetch_process_lost" not in err
    for tenant in tenants:
        assert_store_equals_source(store_url, tenant, data[tenant], "customer")
        assert all(r["status"] == "succeeded" and r["rejected"] > 0
                   for r in runs(store_url, tenant))


def test_a_worker_replaces_a_fetch_process_that_died(
    tenant_server: TenantServer, tenant_id: str, tmp_path: Path,
) -> None:
    """Killed, the fetch process is replaced by one started afresh, which serves the next
    runs; a replacement that dies young is not replaced at once: the worker fetches in its
    own process meanwhile, and carries on either way."""
    data = add_dataset(tenant_server, tenant_id, customers=60)
    store_url = f"sqlite:///{tmp_path}/w.db"
    config = worker_yaml(tmp_path / "w.yaml", tenant_server, store_url, [tenant_id],
                         page_size=10)
    proc, pid = start_worker(config)
    assert proc.stderr is not None
    try:
        wait_for(lambda: succeeded(store_url, tenant_id) >= 1, timeout_s=30)
        os.kill(pid, signal.SIGKILL)
        replacement = fetch_pid(proc.stderr)  # its fetch_process_started line
        assert replacement != pid and _parent_of(replacement) == proc.pid
        before = succeeded(store_url, tenant_id)
        wait_for(lambda: succeeded(store_url, tenant_id) >= before + 2, timeout_s=30)
        os.kill(replacement, signal.SIGKILL)
        assert gone(replacement, 10)
        before = succeeded(store_url, tenant_id)
        wait_for(lambda: succeeded(store_url, tenant_id) >= before + 2, timeout_s=30)
    finally:
        err = stop(proc)
    assert err.count('"fetch_process_lost"') == 1, err  # the first was read by fetch_pid
    assert "another is started in 60 s" in err
    assert '"fetch_process_started"' not in err, "no second replacement within 60 s"
    # At most the run each was fetching failed; the others took over.
    assert sum(r["status"] == "failed" for r in runs(store_url, tenant_id)) <= 2
    assert_store_equals_source(store_url, tenant_id, data, "customer")


def test_the_fetch_process_survives_a_sigterm_to_the_whole_service(
    tenant_server: TenantServer, tenant_id: str, tmp_path: Path,
) -> None:
    """A service manager signals every process of the service: the fetch process leaves the
    ending to the worker, whose run in flight ends `interrupted`, not failed."""
    data = add_dataset(tenant_server, tenant_id, customers=300)
    data.page_delay_s = 0.05
    store_url = f"sqlite:///{tmp_path}/w.db"
    config = worker_yaml(tmp_path / "w.yaml", tenant_server, store_url, [tenant_id],
                         page_size=10)
    proc, pid = start_worker(config)
    wait_for(lambda: sum(1 for p, _, _ in tenant_server.requests
                         if p == f"/{tenant_id}/customers") >= 4)
    os.kill(pid, signal.SIGTERM)
    stop(proc)
    assert gone(pid, 10)
    (first,) = runs(store_url, tenant_id)
    assert first["status"] == "interrupted" and first["pages"] >= 1


def test_requests_that_fail_in_the_fetch_process_count_in_the_workers_metrics(
    tenant_server: TenantServer, tenant_id: str, tmp_path: Path,
) -> None:
    add_dataset(tenant_server, tenant_id, customers=30)
    tenant_server.fail_next(tenant_id, "customers", Fault(status=503), Fault(status=503))
    store_url = f"sqlite:///{tmp_path}/w.db"
    config = worker_yaml(tmp_path / "w.yaml", tenant_server, store_url, [tenant_id],
                         page_size=10)
    port = _free_port()
    doc = yaml.safe_load(config.read_text())
    doc["worker"].update(metrics_port=port, metrics_host="127.0.0.1")
    doc["retry"] = {"initial_wait": 0.01, "max_wait": 0.02}
    config.write_text(yaml.safe_dump(doc))
    proc, _ = start_worker(config)
    try:
        wait_for(lambda: succeeded(store_url, tenant_id) >= 1, timeout_s=30)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as got:
            metrics = got.read().decode()
    finally:
        stop(proc)
    assert (f'puller_http_errors_total{{scope="customer",status="503",tenant="{tenant_id}"}}'
            " 2.0") in metrics
    assert f'puller_retries_total{{scope="customer",tenant="{tenant_id}"}} 2.0' in metrics
    assert "puller_fetch_process_up 1.0" in metrics


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
