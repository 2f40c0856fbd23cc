"""`puller run` as a real process (signals), and the operator commands runs/rejects/purge/forget."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

from puller.tenant_server import TenantServer
from tests.acceptance.test_cli import _env, assert_store_equals_source, puller, runs
from tests.conftest import add_dataset


def worker_yaml(path: Path, server: TenantServer, store_url: str, tenants: list[str],
                **callback: Any) -> Path:
    path.write_text(yaml.safe_dump({
        "store": store_url, "allow_private_networks": True,
        "worker": {"startup_jitter": 0, "shutdown_grace": "10s"},
        "tenants": [{"id": t, "shop": f"{t}.example.com", "callbacks": {"customer": {
            "url": f"{server.url}/{t}/customers", "schedule": {"every": "0.5s"}, **callback}}}
            for t in tenants],
    }))
    return path


def start_worker(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "puller", "run", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())


def wait_for(check: Any, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_sigterm_mid_sweep_exits_0_and_restart_resumes(tenant_server: TenantServer,
                                                       tenant_id: str, tmp_path: Path) -> None:
    """SIGTERM mid-sweep: the page in flight commits, the run is `interrupted`, exit 0; a
    restarted worker resumes at the checkpoint and the store ends equal to the source."""
    data = add_dataset(tenant_server, tenant_id, customers=300, invalid_every=11)
    data.page_delay_s = 0.05
    store_url = f"sqlite:///{tmp_path}/w.db"
    config = worker_yaml(tmp_path / "w.yaml", tenant_server, store_url, [tenant_id],
                         page_size=10)
    proc = start_worker(config)
    wait_for(lambda: sum(1 for p, _, _ in tenant_server.requests
                         if p == f"/{tenant_id}/customers") >= 6)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    (first,) = runs(store_url, tenant_id)
    # 6 requests seen; with prefetch 2 at least 3 of those pages had committed.
    assert first["status"] == "interrupted" and 3 <= first["pages"] < 30
    assert "worker_stopped" in err

    tenant_server.requests.clear()
    data.page_delay_s = 0.0
    proc = start_worker(config)
    try:
        wait_for(lambda: any(r["status"] == "succeeded" for r in runs(store_url, tenant_id)))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    pages = [q["page"] for p, q, _ in tenant_server.requests if p == f"/{tenant_id}/customers"]
    assert pages[0] == str(first["pages"] + 1), "resumed at the checkpoint"
    assert_store_equals_source(store_url, tenant_id, data, "customer")
    assert proc.returncode == 0


def test_sighup_reloads_and_refuses_a_broken_config(tenant_server: TenantServer,
                                                    tmp_path: Path) -> None:
    """SIGHUP: an added tenant starts; a broken file is refused, logged, the worker goes on."""
    add_dataset(tenant_server, "hup-a", customers=5)
    add_dataset(tenant_server, "hup-b", customers=5)
    store_url = f"sqlite:///{tmp_path}/w.db"
    config = worker_yaml(tmp_path / "w.yaml", tenant_server, store_url, ["hup-a"])
    proc = start_worker(config)
    try:
        wait_for(lambda: len(runs(store_url, "hup-a")) >= 1)
        worker_yaml(config, tenant_server, store_url, ["hup-a", "hup-b"])
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(runs(store_url, "hup-b")) >= 1)
        config.write_text("tenants: [\n")
        proc.send_signal(signal.SIGHUP)
        before = len(runs(store_url, "hup-b"))
        wait_for(lambda: len(runs(store_url, "hup-b")) >= before + 2)
        assert proc.poll() is None, "the worker keeps running on the old config"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    events = [orjson.loads(line) for line in err.splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert "config_reloaded" in names
    (refused,) = [e for e in events if e["event"] == "config_reload_failed"]
    assert "line" in refused["error"] and "previous configuration keeps running" in refused["hint"]
    assert proc.returncode == 0


def test_runs_and_rejects_views_filter_and_print_json(tenant_server: TenantServer,
                                                      tenant_id: str, tmp_path: Path) -> None:
    """`puller runs` and `puller rejects` filter by tenant/scope/status/run; table or JSON."""
    add_dataset(tenant_server, tenant_id, customers=40, products=5, invalid_every=8)
    store_url = f"sqlite:///{tmp_path}/v.db"
    config = tmp_path / "v.yaml"
    callbacks = {scope: {"url": f"{tenant_server.url}/{tenant_id}/{scope}s"}
                 for scope in ("customer", "product")}
    config.write_text(yaml.safe_dump({
        "store": store_url, "allow_private_networks": True,
        "tenants": [{"id": tenant_id, "shop": f"{tenant_id}.example.com", "callbacks": callbacks}],
    }))
    assert puller("pull", "--config", str(config)).returncode == 0
    listed = orjson.loads(puller("runs", "--config", str(config), "--json", "--scope",
                                 "customer").stdout)
    assert [(r["scope"], r["status"], r["rejected"]) for r in listed] == [
        ("customer", "succeeded", 5)]
    assert orjson.loads(puller("runs", "--config", str(config), "--json", "--status",
                               "failed").stdout) == []
    rejects = orjson.loads(puller("rejects", "--config", str(config), "--json", "--run",
                                  str(listed[0]["id"])).stdout)
    assert len(rejects) == 5 and all(r["reasons"] for r in rejects)
    table = puller("rejects", "--config", str(config), "--tenant", tenant_id).stdout
    assert "consent: 'YES' must be exactly Yes or No" in table
    assert "succeeded" in puller("runs", "--config", str(config)).stdout


def test_forget_and_purge_commands(tenant_server: TenantServer, tenant_id: str,
                                   tmp_path: Path) -> None:
    """`forget` erases one customer and logs that, not who; `purge` reports what it removed."""
    add_dataset(tenant_server, tenant_id, customers=10)
    store_url = f"sqlite:///{tmp_path}/f.db"
    config = worker_yaml(tmp_path / "f.yaml", tenant_server, store_url, [tenant_id])
    assert puller("pull", "--config", str(config)).returncode == 0
    done = puller("forget", "--config", str(config), "--tenant", tenant_id, "--customer", "c3")
    assert done.returncode == 0 and "erased: 1 customer row(s)" in done.stdout
    (event,) = [orjson.loads(line) for line in done.stderr.splitlines()
                if "customer_forgotten" in line]
    assert event["tenant"] == tenant_id and "c3" not in done.stderr
    assert puller("forget", "--config", str(config), "--tenant", "nobody", "--customer",
                  "c1").returncode == 2
    purged = puller("purge", "--config", str(config))
    assert purged.returncode == 0 and "purged: 0 customer" in purged.stdout
