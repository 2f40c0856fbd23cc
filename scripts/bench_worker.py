"""`scripts/bench-worker`: the long-lived worker (`puller run`) with and without
`--fetch-process`, side by side, on scripts/bench's fast tenant server.

Each measurement starts a worker on a fresh store whose tenants (default 100 x 2,000
customers) are all due at once, and times the store's own clock, from the first run's
start to the last run's finish, once every tenant has a succeeded run; then the worker
is stopped with SIGTERM (it must exit 0). The two settings are measured in interleaved
rounds (`--repeat`, default 3) and the medians printed, with their ratio.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import bench

_QUERY = sa.text("SELECT count(DISTINCT tenant_id), min(started_at), max(finished_at) "
                 "FROM runs WHERE status = 'succeeded'")


def measure(url: str, store_kind: str, size: int, tenants: int, *, fetch_process: bool,
            folder: Path, every_s: float = 20.0) -> float:
    """Seconds from the first run's start to the last run's finish, every tenant once."""
    store = f"sqlite:///{folder}/w-{time.monotonic_ns()}.db"
    if store_kind == "postgres":
        fresh = bench.fresh_pg()
        if fresh is None:
            raise SystemExit("PostgreSQL is not reachable at " + bench.PG_ADMIN)
        store = fresh
    # Every tenant due `every_s` after start, each run once while measured.
    config = bench.puller_config(
        folder, url, store, size, tenants, "page", None, every_s=every_s,
        worker="{startup_jitter: 0, max_concurrent_runs: 8, max_runs_per_tenant: 1}")
    argv = [sys.executable, "-m", "puller", "--log-level", "warning", "run", "--config",
            str(config), *(["--fetch-process"] if fetch_process else [])]
    with open(folder / "worker.err", "w") as err:
        worker = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    try:
        first, last = _when_all_done(worker, store, tenants, folder / "worker.err")
        worker.send_signal(signal.SIGTERM)
        if worker.wait(60) != 0:
            raise SystemExit(f"the worker exited {worker.returncode} on SIGTERM")
    finally:
        if worker.poll() is None:
            worker.kill()
        if store_kind == "postgres":
            bench.drop_pg(store)
    if isinstance(first, str):  # SQLite's text times, both in UTC
        first, last = datetime.fromisoformat(first), datetime.fromisoformat(last)
    return float((last - first).total_seconds())


def _when_all_done(worker: subprocess.Popen[bytes], store: str, tenants: int,
                   log: Path) -> tuple[Any, Any]:
    """The first start and the last finish, once every tenant has a succeeded run."""
    engine = sa.create_engine(store)
    try:
        while True:
            if worker.poll() is not None:
                raise SystemExit(f"the worker ended ({worker.returncode}):\n"
                                 + log.read_text()[-3000:])
            try:
                with engine.connect() as conn:
                    done, first, last = conn.execute(_QUERY).one()
            except sa.exc.SQLAlchemyError:  # its tables are not there yet
                done = 0
            if done >= tenants:
                return first, last
            time.sleep(0.2)
    finally:
        engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench-worker")
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--records", type=int, default=2_000, help="customers a tenant")
    parser.add_argument("--page-size", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--every", type=float, default=20.0,
                        help="the tenants' schedule, seconds: all are first due this long "
                        "after the worker starts; keep it above one measurement, so that "
                        "no tenant runs twice in it (default %(default)s)")
    args = parser.parse_args()
    me = [sys.executable, str(Path(bench.__file__).resolve())]
    server, url = bench.start_server(me, args.records, args.tenants, str(args.page_size))
    stores = ["sqlite"] if args.no_postgres else ["sqlite", "postgres"]
    total = args.tenants * args.records
    print(f"{args.tenants} tenants x {args.records:,} customers, page size {args.page_size}, "
          f"every tenant due at once, max_concurrent_runs 8; first run's start to last "
          f"run's finish, median of {args.repeat} interleaved rounds", flush=True)
    try:
        with tempfile.TemporaryDirectory() as folder:
            seconds: dict[tuple[str, bool], list[float]] = {}
            for _ in range(args.repeat):
                for store_kind in stores:
                    for fetch_process in (False, True):
                        seconds.setdefault((store_kind, fetch_process), []).append(measure(
                            url, store_kind, args.page_size, args.tenants,
                            fetch_process=fetch_process, folder=Path(folder),
                            every_s=args.every))
    finally:
        server.terminate()
        server.wait()
    for store_kind in stores:
        plain = statistics.median(seconds[(store_kind, False)])
        fetched = statistics.median(seconds[(store_kind, True)])
        print(f"  {store_kind:<9} puller run {plain:6.2f} s ({total / plain:8,.0f} rec/s); "
              f"run --fetch-process {fetched:6.2f} s ({total / fetched:8,.0f} rec/s): "
              f"{plain / fetched:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
