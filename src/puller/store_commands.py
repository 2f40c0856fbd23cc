"""The commands that read or change the store without pulling (status, runs, rejects, purge,
forget, db upgrade, db current) and `config check`: their arguments and what they print.
cli parses the command line and runs them; each returns its exit code (errors.EXIT_*).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from puller import logs, pipeline, pulls, report
from puller.config import PullerConfig
from puller.config_file import read_config
from puller.domain import Scope
from puller.errors import EXIT_FAILED, EXIT_OK
from puller.protocol import json_text

if TYPE_CHECKING:
    from puller.store import ScopeStatus, Store


def add_views(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`status`, `runs` and `rejects`."""
    status = sub.add_parser("status", help="checkpoint and last run per tenant and scope")
    status.add_argument("--config", required=True, type=Path)
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_cmd_status)

    runs = sub.add_parser("runs", help="recent runs, newest first")
    _add_view_args(runs)
    runs.add_argument("--status", choices=["running", "succeeded", "failed", "interrupted",
                                           "abandoned"])
    runs.set_defaults(handler=_cmd_runs)

    rejects = sub.add_parser("rejects", help="rejected records with their reasons")
    _add_view_args(rejects)
    rejects.add_argument("--run", type=int, help="only this run id")
    rejects.set_defaults(handler=_cmd_rejects)


def add_admin(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`purge`, `forget`, `db upgrade`, `db current` and `config check`."""
    purge = sub.add_parser("purge", help="delete what retention allows, now")
    purge.add_argument("--config", required=True, type=Path)
    purge.set_defaults(handler=_cmd_purge)

    forget = sub.add_parser("forget", help="erase one customer's personal data now (GDPR)")
    forget.add_argument("--config", required=True, type=Path)
    forget.add_argument("--tenant", required=True)
    forget.add_argument("--customer", required=True, help="the customer_id")
    forget.set_defaults(handler=_cmd_forget)

    db = sub.add_parser("db", help="the store's schema (Alembic migrations)")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    for name, handler, text in (
        ("upgrade", _cmd_db_upgrade, "upgrade the schema to this puller's revision"),
        ("current", _cmd_db_current, "show the schema revision (exit 1 when not current)"),
    ):
        command = db_sub.add_parser(name, help=text)
        command.add_argument("--config", required=True, type=Path)
        command.set_defaults(handler=handler)

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a config file without running")
    check.add_argument("path", type=Path)
    check.set_defaults(handler=_cmd_config_check)


def _add_view_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--tenant")
    parser.add_argument("--scope", type=lambda v: Scope.parse(v).value)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--json", action="store_true")


@contextmanager
def opened(path: Path, *, check_schema: bool = True, config: PullerConfig | None = None
           ) -> Iterator[tuple[PullerConfig, Store]]:
    """The config at `path` (or `config`, read from it already) and its store, closed
    afterwards."""
    config = config or read_config(path)
    store = pulls.open_store(config.store, check_schema=check_schema)
    try:
        yield config, store
    finally:
        store.close()


def _cmd_status(args: argparse.Namespace) -> int:
    with opened(args.config) as (config, store):
        statuses = store.status([(t.id, s) for t in config.tenants for s in t.callbacks])
    rows = [_status_row(s) for s in statuses]
    report.rows("puller status", rows, ["tenant", "scope", "next", "last_run", "last_status",
                                        "last_started_at", "pages", "accepted", "rejected",
                                        "stale"], as_json=args.json)
    return EXIT_OK


def _status_row(status: ScopeStatus) -> dict[str, Any]:
    cp = status.checkpoint
    if cp is None or cp.is_fresh:
        position = "new sweep"
    elif cp.next_page is not None:
        position = f"page {cp.next_page}"
    else:
        position = f"page {cp.next_number} (cursor)"
    run = status.last_run or {}
    started = run.get("started_at")
    return {
        "tenant": status.tenant, "scope": status.scope, "next": position,
        "last_run": run.get("id"), "last_status": run.get("status", "never run"),
        "last_started_at": started.isoformat(timespec="seconds") if started else None,
        "pages": run.get("pages"), "accepted": run.get("accepted"),
        "rejected": run.get("rejected"), "stale": run.get("stale"), "error": run.get("error"),
    }


def _cmd_runs(args: argparse.Namespace) -> int:
    with opened(args.config) as (_, store):
        rows = store.list_runs(tenant=args.tenant, scope=args.scope, status=args.status,
                               limit=args.limit)
    report.rows("puller runs", rows, ["id", "tenant_id", "scope", "trigger", "status",
                                      "started_at", "finished_at", "pages", "accepted",
                                      "rejected", "stale", "error"], as_json=args.json)
    return EXIT_OK


def _cmd_rejects(args: argparse.Namespace) -> int:
    with opened(args.config) as (_, store):
        rows = store.list_rejects(tenant=args.tenant, scope=args.scope, run_id=args.run,
                                  limit=args.limit)
    if not args.json:
        rows = [{**r, "reasons": "; ".join(r["reasons"]),
                 "record": json_text(r["record"])[:80]} for r in rows]
    report.rows("puller rejects", rows, ["id", "tenant_id", "scope", "run_id", "page",
                                         "position", "reasons", "record"], as_json=args.json)
    return EXIT_OK


def _cmd_purge(args: argparse.Namespace) -> int:
    with opened(args.config) as (config, store):
        retention = config.retention
        removed = store.purge(now=pipeline.SystemClock().now(),
                              soft_deleted_s=retention.soft_deleted_s,
                              rejected_s=retention.rejected_s, runs_s=retention.runs_s)
    logs.get_logger().info("purge_finished", **removed)
    print("purged: " + ", ".join(f"{count} {what}" for what, count in removed.items()))
    return EXIT_OK


def _cmd_forget(args: argparse.Namespace) -> int:
    with opened(args.config) as (config, store):
        config.tenant(args.tenant)
        erased = store.forget_customer(args.tenant, args.customer)
    # Logged: that an erasure happened and how much; never which customer (it is personal).
    logs.get_logger().info("customer_forgotten", tenant=args.tenant, **erased)
    print(f"erased: {erased['customers']} customer row(s), {erased['rejected']} rejected "
          "record(s). The tenant must stop exporting this customer, or the next sweep "
          "stores it again.")
    return EXIT_OK


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    with opened(args.config, check_schema=False) as (_, store):
        before, _ = store.schema_revision()
        revision = store.upgrade_schema()
    print(f"schema upgraded from {before or 'empty'} to {revision} (current)")
    return EXIT_OK


def _cmd_db_current(args: argparse.Namespace) -> int:
    with opened(args.config, check_schema=False) as (_, store):
        current, needed = store.schema_revision()
    if current == needed:
        print(f"schema revision {current} (current)")
        return EXIT_OK
    print(f"schema revision {current or 'none'}; this puller needs {needed} — run "
          "`puller db upgrade --config PATH`")
    return EXIT_FAILED


def _cmd_config_check(args: argparse.Namespace) -> int:
    config = read_config(args.path)
    callbacks = sum(len(t.callbacks) for t in config.tenants)
    print(f"{args.path}: valid — {len(config.tenants)} tenants, {callbacks} callbacks")
    return EXIT_OK
