"""The `puller` command: parse arguments, build the parts, map outcomes to exit codes."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import gc
import os
import sys
import threading
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from puller import (
    __version__,
    errors,
    fanout,
    logs,
    pipeline,
    pulls,
    report,
    store_commands,
)
from puller.config import PullerConfig, dialect_of
from puller.config_file import read_config
from puller.domain import Scope
from puller.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    # Imported where HTTP is needed: aiohttp's import alone is ~0.25 s that `status`,
    # `runs` and the other store commands do not need. The store (SQLAlchemy, ~0.3 s) is
    # imported where a command opens it: `pull --fetch-process` forks before that, so the
    # fetch process never imports SQLAlchemy and imports its HTTP client meanwhile.
    from puller import fetcher
    from puller.store import Store


DEFAULT_CONCURRENCY = 8
INTERRUPTED = ("puller: interrupted — runs in flight were recorded as interrupted; the next "
               "pull resumes at their checkpoints")


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the `puller` command; the only place that exits the process."""
    _end(run(argv))


def _end(code: int) -> NoReturn:
    """End the process with `code` once the command is done.

    The interpreter's own ending is work for a process that is going away: its last
    garbage collection walks every object imported (SQLAlchemy, pydantic, aiohttp …),
    ~0.2 s of a pull on this project's machine, and its clearing of every module frees
    them one by one, ~0.08 s more. So the atexit handlers run (logging's flush among
    them), stdout and stderr are flushed, and the process ends at once (os._exit). A
    thread still running that is not a daemon gets the interpreter's ending, which waits
    for it; puller's commands leave none.
    """
    gc.freeze()
    if any(not t.daemon and t is not threading.main_thread() for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError):  # a reader that went away (`puller runs | head`)
            stream.flush()
    os._exit(code)


def run(argv: Sequence[str] | None = None) -> int:
    """Run a command and return its exit code: 0 ok, 1 a run/store failed, 2 usage/config."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    logs.configure(json=args.log_json, level=args.log_level)
    try:
        code: int = args.handler(args)
    except errors.ConfigError as exc:
        print(f"puller: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except errors.PullerError as exc:
        print(f"puller: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="puller", description=__doc__)
    parser.add_argument("--version", action="version", version=f"puller {__version__}")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-json", action="store_true", default=None,
                        help="JSON log lines even on a terminal (default: JSON off a terminal)")
    sub = parser.add_subparsers(dest="command")
    _add_pull(sub)
    _add_run(sub)
    store_commands.add_views(sub)
    store_commands.add_admin(sub)
    return parser


def _add_pull(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pull = sub.add_parser("pull", help="pull tenants/scopes now, then exit (for cron)")
    pull.add_argument("--config", required=True, type=Path)
    pull.add_argument("--tenant", action="append", default=[], help="repeatable; default all")
    pull.add_argument("--scope", action="append", default=[],
                      help="customer/order/product or 1/2/3; repeatable; default all")
    pull.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                      help="runs at once across tenants (default %(default)s)")
    pull.add_argument("--json", action="store_true", help="print the summary as JSON")
    pull.add_argument("--processes", type=_positive, default=1,
                      help="split the tenants over this many pull processes, to use more "
                      "cores (default %(default)s; see README, Performance)")
    pull.add_argument("--fetch-process", action="store_true",
                      help="fetch, parse and validate pages in a second process, so that a "
                      "large tenant uses two cores (see README, Performance)")
    pull.set_defaults(handler=_cmd_pull)


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", help="the long-lived worker: pull every callback on schedule")
    run.add_argument("--config", required=True, type=Path)
    run.add_argument("--fetch-process", action="store_true",
                     help="fetch, parse and validate every run's pages in a second process, "
                     "so that the worker uses two cores (see README, Operations)")
    run.set_defaults(handler=_cmd_run)

def select_jobs(config: PullerConfig, tenants: Sequence[str], scopes: Sequence[str],
                *, trigger: str) -> list[pipeline.Job]:
    """The (tenant, scope) pairs named on the command line, all configured ones by default."""
    chosen = [config.tenant(t) for t in dict.fromkeys(tenants)] if tenants else config.tenants
    wanted = [Scope.parse(s) for s in scopes]
    jobs = []
    for tenant in chosen:
        for scope in wanted or list(tenant.callbacks):
            if scope in tenant.callbacks:
                jobs.append(pipeline.Job(tenant=tenant, scope=scope, trigger=trigger))
            elif tenants:
                raise errors.ConfigError(
                    path=f"tenants[{tenant.id}].callbacks",
                    problem=f"tenant {tenant.id} has no {scope.value} callback",
                    hint=f"configured: {', '.join(s.value for s in tenant.callbacks)}",
                )
    if not jobs:
        raise errors.ConfigError(path="tenants", problem="nothing to pull",
                                 hint="register a tenant with at least one callback")
    return jobs


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number")
    return value


def _cmd_pull(args: argparse.Namespace) -> int:
    if args.processes > 1 or not args.fetch_process:
        # Imported once, before any fork, not per child. A lone pull with --fetch-process
        # leaves HTTP to its fetch process, which imports it (pull_now).
        from puller import client  # noqa: F401, PLC0415

    # What is imported now lives until the pull ends: kept out of the pull's garbage
    # collections (each full one walked all of it, ~70 ms, 5 times in a pull of 100k at
    # page size 500) and out of the pages a forked child copies on write.
    gc.freeze()
    try:
        return _pull_command(args)
    finally:
        gc.unfreeze()  # an in-process caller (the tests) collects it again


def _pull_command(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    jobs = select_jobs(config, args.tenant, args.scope, trigger="manual")
    keys = [(job.tenant.id, job.scope.value) for job in jobs]
    dealt = fanout.shares(keys, args.processes)
    if len(dealt) > 1:
        # An empty store is created once, before any child; no connection crosses a fork.
        pulls.open_pull_store(config.store).close()
        return _pull_in_processes(args, config, jobs, dealt)
    try:
        results = pulls.pull_jobs(config, jobs, concurrency=max(1, args.concurrency),
                                  fetch_process=args.fetch_process)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(INTERRUPTED, file=sys.stderr)
        return EXIT_FAILED
    _print_pull_rows(pulls.summary_rows(results), as_json=args.json)
    return EXIT_OK if all(r.status == "succeeded" for r in results) else EXIT_FAILED


def _pull_in_processes(args: argparse.Namespace, config: PullerConfig,
                       jobs: Sequence[pipeline.Job],
                       dealt: Sequence[Sequence[fanout.JobKey]]) -> int:
    per_child = -(-max(1, args.concurrency) // len(dealt))
    by_key = {(job.tenant.id, job.scope.value): job for job in jobs}
    logs.get_logger().info("pull_split", processes=len(dealt), concurrency_each=per_child,
                           tenants=len({job.tenant.id for job in jobs}))

    def run_share(share: Sequence[fanout.JobKey]) -> tuple[int, list[dict[str, Any]]]:
        """In a forked child: pull these jobs as a lone `pull` would, without a progress bar."""
        mine = [by_key[key] for key in share]
        try:
            results = pulls.pull_jobs(config, mine, concurrency=per_child,
                                      fetch_process=args.fetch_process, live=False)
        except (KeyboardInterrupt, asyncio.CancelledError):
            return EXIT_FAILED, []
        except errors.ConfigError as exc:
            print(f"puller: {exc}", file=sys.stderr)
            return EXIT_USAGE, []
        except errors.PullerError as exc:
            print(f"puller: {exc}", file=sys.stderr)
            return EXIT_FAILED, []
        ok = all(r.status == "succeeded" for r in results)
        return (EXIT_OK if ok else EXIT_FAILED), pulls.summary_rows(results)

    outcome = fanout.pull_in_processes(dealt, list(by_key), run_share)
    if outcome.rows:
        _print_pull_rows(outcome.rows, as_json=args.json)
    for problem in outcome.problems:
        print(f"puller: {problem}", file=sys.stderr)
    if outcome.interrupted:
        print(INTERRUPTED, file=sys.stderr)
    if EXIT_USAGE in outcome.exit_codes:
        return EXIT_USAGE
    succeeded = all(row["status"] == "succeeded" for row in outcome.rows)
    clean = not outcome.interrupted and all(code == 0 for code in outcome.exit_codes)
    return EXIT_OK if succeeded and clean else EXIT_FAILED


def _print_pull_rows(rows: Sequence[dict[str, Any]], *, as_json: bool) -> None:
    """The pull summary: a table with the errors below it, or JSON (`--json`)."""
    report.rows("puller pull", rows, ["tenant", "scope", "status", "pages", "accepted",
                                      "rejected", "stale", "duration_s", "run_id"],
                as_json=as_json)
    if as_json:
        return
    for row in rows:
        if row["error"]:
            print(f"  run {row['run_id']} ({row['tenant']}/{row['scope']}): {row['error']}")


def _cmd_run(args: argparse.Namespace) -> int:
    fetch = config = None
    if args.fetch_process:
        # Forked first, before the store, the scheduler and the ops server start threads:
        # it lives as long as the worker, which closes it after draining its runs.
        config = read_config(args.config)
        jobs = [pipeline.Job(tenant=t, scope=s, trigger="schedule")
                for t in config.tenants for s in t.callbacks]
        fetch = pulls.start_fetch_process(
            config, jobs, concurrency=config.worker.max_concurrent_runs, worker=True)
    try:
        with store_commands.opened(args.config, config=config) as (config, store):
            store.claim_single_worker()
            pipeline.run_event_loop(_serve(config, args.config, store, fetch))
    finally:
        if fetch is not None:  # the worker closes its last one; this, if it never served
            fetch.close()
    return EXIT_OK


async def _serve(config: PullerConfig, path: Path, store: Store,
                 fetch: fetcher.FetchProcess | None = None) -> None:
    # Imported here: APScheduler and prometheus-client are start-up cost `pull` never needs.
    from puller import client, ops_server, worker  # noqa: PLC0415 - lazy: only `run` needs them

    replace = None
    if fetch is not None:
        from puller import fetcher  # noqa: PLC0415 - imported by pulls.start_fetch_process

        dialect = dialect_of(config.store)
        appliers = pulls.appliers(dialect, config.worker.max_concurrent_runs)

        def replace() -> fetcher.FetchProcess:
            # Started afresh, not forked: the worker has threads by now.
            return fetcher.FetchProcess.spawn(config, dialect=dialect, appliers=appliers)

    async with client.HttpClients(allow_private_networks=config.allow_private_networks) as http:
        serving = worker.Worker(config, load_config=lambda: read_config(path), store=store,
                                http=http, fetch=fetch, replace_fetch=replace)
        ops = None
        if config.worker.metrics_port:
            ops = ops_server.OpsServer(serving, host=config.worker.metrics_host,
                                   port=config.worker.metrics_port).start()
            logs.get_logger().info("ops_server_started", host=config.worker.metrics_host,
                                   port=ops.port, paths=["/metrics", "/healthz"])
        serving.install_signal_handlers()
        try:
            await serving.run()
        finally:
            if ops is not None:
                ops.stop()
