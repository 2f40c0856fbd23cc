"""`scripts/bench` (issue #5) end to end, shrunk: every row and target line it prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[2]


def _bench(pg_admin: sa.Engine, *options: str) -> str:
    """scripts/bench with these options, against the tests' PostgreSQL: what it printed."""
    admin_url = pg_admin.url.set(drivername="postgresql").render_as_string(hide_password=False)
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), *options],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PULLER_BENCH_PG_URL": admin_url})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_prints_every_row_and_target_in_one_run(pg_admin: sa.Engine) -> None:
    """One run measures the single-tenant rows into both stores and the many-tenant
    target; the bench verifies each stored count itself and exits non-zero otherwise."""
    out = _bench(pg_admin, "--records", "1000", "--page-sizes", "50,500", "--repeat", "1",
                 "--many-tenants", "3", "--many-records", "100")
    for store in ("sqlite", "postgres"):
        for what in ("sequential loop + upsert + commit", "puller pull (page)",
                     "puller pull (page, fetch process)",
                     "puller pull, 3 tenants x 100, fetch process",
                     "puller pull, one tenant of 300, fetch process"):
            assert any(line.startswith(what) and f" {store} " in line
                       for line in out.splitlines()), f"no row {what!r} for {store}:\n{out}"
    assert "plain httpx loop (fetch + parse)" in out
    heads = [line for line in out.splitlines() if line.startswith("what ")]
    assert len(heads) == 2 and all(" CPU s steal s" in head for head in heads), out
    for target in ("target SQLite page 50: puller pull (page, fetch process) ≥ 0.6x",
                   "target PostgreSQL page 50: puller pull (page, fetch process) ≥ 1.5x",
                   "target sqlite page 50: 3 tenants' aggregate ≥ the single-tenant figure",
                   "target postgres page 50: 3 tenants' aggregate ≥ the single-tenant figure",
                   "like for like, sqlite page 50: against one tenant of as many records",
                   "target SQLite page 500: puller pull (page, fetch process) ≥ 0.4x",
                   "target PostgreSQL page 500: puller pull (page, fetch process) ≥ 1.5x"):
        assert target in out, f"no line {target!r}:\n{out}"
    # The last line: the eight targets of the configuration meant to meet them, judged.
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("issue #5's targets, pull --fetch-process, 1,000 customers and "
                              "3 tenants x 100: "), out
    assert "every one met in this run (8 of 8)" in verdict or " of 8 NOT met" in verdict, out


@pytest.mark.parametrize("scope", ["order", "product"])
def test_bench_pulls_orders_and_products_too(pg_admin: sa.Engine, scope: str) -> None:
    """--scope order or product: the same rows for that scope, each stored count verified
    by the bench."""
    out = _bench(pg_admin, "--scope", scope, "--records", "300", "--page-sizes", "50",
                 "--repeat", "1", "--no-many")
    assert f"300 {scope}s (1 tenant(s))" in out
    for store in ("sqlite", "postgres"):
        assert any(line.startswith("puller pull (page, fetch process)") and f" {store} " in line
                   for line in out.splitlines()), out


def test_bench_worker_times_the_worker_with_and_without_a_fetch_process(
        pg_admin: sa.Engine) -> None:
    """scripts/bench-worker, shrunk: both settings in both stores, each worker stopped
    with SIGTERM and checked to exit 0 by the script itself."""
    admin_url = pg_admin.url.set(drivername="postgresql").render_as_string(hide_password=False)
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_worker.py"), "--tenants", "3",
         "--records", "60", "--repeat", "1", "--every", "1"],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PULLER_BENCH_PG_URL": admin_url})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("  ")]
    assert [row[0] for row in rows] == ["sqlite", "postgres"], done.stdout
    assert all(row[-1].endswith("x") and float(row[-1][:-1]) > 0 for row in rows)
