"""SQLite's store without SQLAlchemy: the page transaction and a run's own rows on one
writer connection, the leases' file locks (file_leases), and a fresh store's schema
(sqlite_schema; issue #5).

`store.Store` keeps SQLAlchemy for every command and both databases; on SQLite it writes
through `SqliteWriter` below. `puller pull` on a SQLite store needs nothing else, so it
opens `SqliteStore`, which imports no SQLAlchemy: SQLAlchemy's import was ~0.19 s of a
pull's start-up, on its critical path (with `--fetch-process` the main process imported it
while the fetch process, ready sooner, waited for the first sweep).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote

from puller import dberror, errors, forms
from puller.dberror import BUSY_TIMEOUT_ENV
from puller.domain import (
    Accepted,
    Checkpoint,
    PageOutcome,
    Rejection,
    RunStats,
    RunStatus,
    Scope,
    StoreRows,
)
from puller.file_leases import FileLeases, worker_id
from puller.forms import NO_TIME, record_columns, sqlite_time, sqlite_width
from puller.protocol import json_text
from puller.sqlite_schema import ensure_schema

SQLITE_BUSY_TIMEOUT_MS = 10_000
TABLES = {Scope.CUSTOMER: "customers", Scope.ORDER: "orders", Scope.PRODUCT: "products"}
"""The record tables (schema.RECORD_TABLES; upsert.check_layouts checks them)."""

_FROM_PAGE = ("tenant_id", "run_id", "stored_at")  # bound once per page, not per row
ABANDONED = "the process ended without finishing this run"


def database_path(url: str) -> str | None:
    """The file of a sqlite:///PATH store URL; None for any other URL, an in-memory
    database, or one with query options (those need SQLAlchemy's reading of the URL)."""
    scheme, found, rest = url.partition(":///")
    if not found or scheme not in ("sqlite", "sqlite+pysqlite") or "?" in rest:
        return None
    if rest in ("", ":memory:") or rest.startswith("file:"):
        return None
    return unquote(rest)  # as SQLAlchemy reads it: a test compares the two


def pragmas(db: sqlite3.Connection) -> None:
    """What every puller connection to SQLite sets, whoever opened it."""
    # pysqlite would otherwise commit DDL implicitly; with its own transaction handling off
    # and BEGIN emitted by puller (and by SQLAlchemy: store._sqlite_begin), migrations are
    # transactional too.
    db.isolation_level = None
    # WAL lets status readers run beside the writer; synchronous=FULL fsyncs the WAL at
    # every commit, so a page that was acknowledged survives power loss (NORMAL would not).
    cursor = db.cursor()
    busy_ms = int(os.environ.get(BUSY_TIMEOUT_ENV) or SQLITE_BUSY_TIMEOUT_MS)
    cursor.execute(f"PRAGMA busy_timeout={busy_ms}")  # first: switching to WAL may wait
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def store_error(exc: Exception) -> errors.StoreError:
    return errors.StoreError(
        f"{type(getattr(exc, 'orig', None) or exc).__name__}: {dberror.first_line(exc)} — "
        f"nothing of this step was written; {dberror.hint(exc)}"
    )


# ---------------------------------------------------------------- the statements
def upsert_clause(table: str, names: Sequence[str], key: str) -> str:
    """ON CONFLICT DO UPDATE … WHERE newer (merge.is_newer in SQL), full replacement: the
    same text for both databases (upsert.statement)."""
    updates = ", ".join(f'"{n}" = excluded."{n}"' for n in names if n not in ("tenant_id", key))
    return (f'ON CONFLICT ("tenant_id", "{key}") DO UPDATE SET {updates} '
            f'WHERE "{table}"."last_modified_date" < excluded."last_modified_date"')


@cache
def statement(scope: Scope, rows: int) -> str:
    """SQLite's page upsert: INSERT … SELECT FROM (VALUES (?, …), (?, …) …) for `rows` rows
    of forms.sqlite_rows, with the tenant, the run and the time as ?1, ?2 and ?3, and
    forms.NO_TIME as ?4 (a deleted_at of that value is stored as NULL); applied rows
    counted by total_changes."""
    table, key = TABLES[scope], scope.id_field
    names = ["tenant_id", *record_columns(scope), "run_id", "stored_at"]
    # A VALUES subquery's columns are column1, column2, …; a "?" after ?4 is ?5, and so on.
    # `WHERE true` tells SQLite's parser that ON CONFLICT starts the upsert, not a join.
    width = sqlite_width(scope)
    picks = ["?1", *[f"column{n}" for n in range(1, width)], f"NULLIF(column{width}, ?4)",
             "?2", "?3"]
    row = f"({', '.join('?' * width)})"
    columns = ", ".join(f'"{n}"' for n in names)
    # Identifiers are puller's own, never from input; every value is a bound parameter.
    return (f'INSERT INTO "{table}" ({columns}) '  # noqa: S608
            f"SELECT {', '.join(picks)} FROM (VALUES {', '.join([row] * rows)}) "
            f"WHERE true {upsert_clause(table, names, key)}")


BLOCK_ROWS = 512
"""The most rows one SQLite upsert statement takes (fewer where SQLite allows fewer
variables): blocks are powers of two, so a few statements of each scope are prepared."""


def upsert(db: sqlite3.Connection, scope: Scope, values: list[str], *,
           tenant: str, run_id: int, now: datetime) -> None:
    """Upsert forms.sqlite_rows' `values` in blocks of multi-row VALUES, largest first: a
    page of 500 is six statements (256 + 128 + … + 4 rows), of 50 three. Against one
    execution a row (`executemany`), SQLite's own page transactions of 100k customers took
    20% less CPU at page size 500 and 11% less at 50. With the tenant, the run and the time
    bound once a statement instead of in every row, they took 0.36-0.37 -> 0.31-0.32 s at
    page size 500 (3 rounds; within the noise at 50), and no row is copied to be stamped.
    The rows are applied in order, as one statement a row would apply them."""
    width = sqlite_width(scope)
    count = len(values) // width
    page = [tenant, run_id, sqlite_time(now), NO_TIME]
    room = db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) - len(page)
    block = 1 << (min(BLOCK_ROWS, room // width).bit_length() - 1)
    at = 0
    while at < count:
        while block > count - at:
            block //= 2
        db.execute(statement(scope, block), page + values[at * width:(at + block) * width])
        at += block


REJECT = (
    "INSERT INTO rejected_records (tenant_id, scope, run_id, page, position, record, reasons, "
    "rejected_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
COUNT = (
    "UPDATE runs SET pages = pages + 1, accepted = accepted + ?, rejected = rejected + ?, "
    "stale = stale + ?, normalised = normalised + ? WHERE id = ?"
)
CHECKPOINT_UPSERT = (
    "ON CONFLICT (tenant_id, scope) DO UPDATE SET next_number = excluded.next_number, "
    "next_page = excluded.next_page, next_cursor = excluded.next_cursor, "
    "run_id = excluded.run_id, updated_at = excluded.updated_at"
)
# Only constant text is joined into SQL here and below; every value is a bound parameter.
CHECKPOINT = (
    "INSERT INTO checkpoints (tenant_id, scope, next_number, next_page, next_cursor, run_id, "  # noqa: S608
    f"updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) {CHECKPOINT_UPSERT}"
)
# A run's own rows, on the driver connection as the page's statements: through
# SQLAlchemy's statement machinery, starting a run, reading its checkpoint and finishing it
# cost ~1.7 ms of CPU a sweep, which a pull of many small tenants pays for each.
ABANDON = (
    "UPDATE runs SET status = 'abandoned', finished_at = ?, error = ? "
    "WHERE tenant_id = ? AND scope = ? AND status = 'running'"
)
START_RUN = (
    "INSERT INTO runs (tenant_id, scope, trigger, status, started_at, pages, accepted, "
    "rejected, stale, normalised, acks_failed, worker) "
    "VALUES (?, ?, ?, 'running', ?, 0, 0, 0, 0, 0, 0, ?)"
)
FINISH_RUN = "UPDATE runs SET status = ?, finished_at = ?, error = ? WHERE id = ?"
RUN_STATS = (
    "SELECT pages, accepted, rejected, stale, normalised, acks_failed FROM runs WHERE id = ?"
)
LOAD_CHECKPOINT = (
    "SELECT next_number, next_page, next_cursor FROM checkpoints "
    "WHERE tenant_id = ? AND scope = ?"
)
FAILED_ACK = "UPDATE runs SET acks_failed = acks_failed + 1 WHERE id = ?"
LAST_COMPLETED_START = (
    "SELECT max(started_at) FROM runs WHERE tenant_id = ? AND scope = ? "
    "AND status IN ('succeeded', 'failed')"
)


def rejection_rows(rejections: Sequence[Rejection], scope: Scope, *, tenant: str,
                   run_id: int, page: str, now: datetime) -> list[tuple[Any, ...]]:
    """Rejected records as REJECT rows."""
    at = sqlite_time(now)
    return [(tenant, scope.value, run_id, page, r.position, json_text(r.raw),
             json_text(list(r.reasons)), at) for r in rejections]


def checkpoint_row(checkpoint: Checkpoint, scope: Scope, *, tenant: str, run_id: int,
                   now: datetime) -> tuple[Any, ...]:
    """The CHECKPOINT row."""
    return (tenant, scope.value, checkpoint.next_number, checkpoint.next_page,
            checkpoint.next_cursor, run_id, sqlite_time(now))


# ---------------------------------------------------------------- the writer
class Handle(Protocol):
    """The writer's connection: SQLAlchemy's pooled one (store.Store) or sqlite3's own."""

    @property
    def driver_connection(self) -> Any: ...

    def close(self) -> None: ...

    def invalidate(self) -> None: ...


class OwnConnection:
    """A Handle over a sqlite3 connection of puller's own (SqliteStore)."""

    def __init__(self, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False)
        pragmas(self._db)

    @property
    def driver_connection(self) -> sqlite3.Connection:
        return self._db

    def close(self) -> None:
        self._db.close()

    def invalidate(self) -> None:
        self._db.close()


class SqliteWriter:
    """A store's one SQLite writer connection, taken in turn under a lock, and what is
    written through it: a page's transaction, a run's start and finish, its checkpoint."""

    def __init__(self, connect: Callable[[], Handle]) -> None:
        self._connect = connect
        self._writer: Handle | None = None
        self._writing = threading.Lock()

    @property
    def kept_connections(self) -> int:
        """1 once a write opened the writer connection, which is kept until close."""
        return 0 if self._writer is None else 1

    def close(self) -> None:
        with self._writing:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    @contextmanager
    def transaction(self, *, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        """BEGIN … COMMIT on this store's one SQLite writer connection, one thread at a
        time: rolled back, and the error made a StoreError, if anything fails. `immediate`:
        the write lock taken at BEGIN, for a transaction that writes what it read.

        One connection and a lock, not a pooled connection each: SQLite has one writer at
        a time anyway, and a connection drops its page cache whenever another connection
        wrote. With eight sweeps at once, each page on whichever pooled connection was
        free re-read the tables' pages (and waited in SQLite's busy handler, which sleeps
        1, 2, 5 … ms between tries): the main process of a pull of 100 tenants x 2,000
        customers with --fetch-process used 3.3 s of CPU at page size 50 against 2.5 s
        for one tenant of 200,000."""
        with self._writing:
            if self._writer is None:
                try:
                    self._writer = self._connect()
                except (sqlite3.Error, OSError) as exc:  # OSError: its folder cannot be made
                    raise store_error(exc) from exc
            db: sqlite3.Connection = self._writer.driver_connection
            try:
                db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
                yield db
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.Error:  # a connection that cannot roll back is let go
                        self._writer.invalidate()
                        self._writer = None
                if isinstance(exc, sqlite3.Error):
                    raise store_error(exc) from exc
                raise

    def start_run(self, tenant: str, scope: Scope, *, trigger: str, now: datetime) -> int:
        at = sqlite_time(now)
        with self.transaction() as db:
            db.execute(ABANDON, (at, ABANDONED, tenant, scope.value))
            run_id = db.execute(START_RUN, (tenant, scope.value, trigger, at,
                                            worker_id())).lastrowid
        assert run_id is not None  # an INSERT's row id
        return run_id

    def load_checkpoint(self, tenant: str, scope: Scope) -> Checkpoint:
        with self.transaction() as db:
            found = db.execute(LOAD_CHECKPOINT, (tenant, scope.value)).fetchone()
        return Checkpoint() if found is None else Checkpoint(*found)

    def last_completed_start(self, tenant: str, scope: Scope) -> datetime | None:
        with self.transaction() as db:
            (found,) = db.execute(LAST_COMPLETED_START, (tenant, scope.value)).fetchone()
        return None if found is None else datetime.fromisoformat(found).replace(tzinfo=UTC)

    def apply_page(
        self, *, run_id: int, tenant: str, scope: Scope, page: str,
        accepted: Sequence[Accepted], rejections: Sequence[Rejection], checkpoint: Checkpoint,
        normalised: int, now: datetime, rows: StoreRows | None = None,
    ) -> PageOutcome:
        """The page on the driver connection in one BEGIN … COMMIT: the records' upsert
        (a few statements, `upsert`), the rejections, the counters and the checkpoint."""
        rows = forms.page_rows(accepted, rows, scope, "sqlite")
        records = rows.payload  # tenant, run and time are the statement's parameters
        if len(records) != rows.survivors * sqlite_width(scope):
            # A defect, not input: a NUL in a value, where none can be (StoreRows.__reduce__)
            raise AssertionError(f"{len(records)} values for {rows.survivors} {scope} rows")
        offered = rows.survivors + rows.duplicates  # every accepted record not applied is stale
        with self.transaction() as db:
            before = db.total_changes
            if records:
                # A stale row's DO UPDATE ... WHERE changes nothing, so the connection's
                # change counter counts exactly the rows applied.
                upsert(db, scope, records, tenant=tenant, run_id=run_id, now=now)
            applied = int(db.total_changes - before)
            if rejections:
                db.executemany(REJECT, rejection_rows(
                    rejections, scope, tenant=tenant, run_id=run_id, page=page, now=now))
            db.execute(COUNT, (applied, len(rejections), offered - applied, normalised, run_id))
            db.execute(CHECKPOINT, checkpoint_row(checkpoint, scope, tenant=tenant,
                                                  run_id=run_id, now=now))
        return PageOutcome(applied=applied, stale=offered - applied, rejected=len(rejections))

    def count_failed_ack(self, run_id: int) -> None:
        with self.transaction() as db:
            db.execute(FAILED_ACK, (run_id,))

    def finish_run(self, run_id: int, *, status: RunStatus, now: datetime,
                   error: str | None = None) -> RunStats:
        with self.transaction() as db:
            db.execute(FINISH_RUN, (status, sqlite_time(now), forms.stored_error(error),
                                    run_id))
            found = db.execute(RUN_STATS, (run_id,)).fetchone()
        if found is None:
            raise errors.StoreError(f"run {run_id} is no longer in the store: it was "
                                    "deleted while it ran; its pages are stored, and the "
                                    "next run resumes at the checkpoint")
        return RunStats(*found)


# ---------------------------------------------------------------- the pull's store
class SqliteStore:
    """pipeline.PageSink on a SQLite file without SQLAlchemy: what `puller pull` needs."""

    def __init__(self, path: str) -> None:
        self._writer = SqliteWriter(lambda: OwnConnection(path))
        self._leases = FileLeases(path)

    @classmethod
    def open(cls, path: str) -> SqliteStore:
        """Open (a fresh file is brought to the current schema).

        Raises:
            errors.SchemaError: the schema is behind (or ahead of) this puller.
        """
        store = cls(path)
        try:
            ensure_schema(lambda: store._writer.transaction(immediate=True))
        except errors.StoreError:
            store.close()
            raise
        return store

    def lease(self, tenant: str, scope: Scope) -> AbstractContextManager[bool]:
        return self._leases.hold(tenant, scope)

    def last_completed_start(self, tenant: str, scope: Scope) -> datetime | None:
        return self._writer.last_completed_start(tenant, scope)

    def start_run(self, tenant: str, scope: Scope, *, trigger: str, now: datetime) -> int:
        return self._writer.start_run(tenant, scope, trigger=trigger, now=now)

    def load_checkpoint(self, tenant: str, scope: Scope) -> Checkpoint:
        return self._writer.load_checkpoint(tenant, scope)

    def apply_page(
        self, *, run_id: int, tenant: str, scope: Scope, page: str,
        accepted: Sequence[Accepted], rejections: Sequence[Rejection], checkpoint: Checkpoint,
        normalised: int, now: datetime, rows: StoreRows | None = None,
    ) -> PageOutcome:
        return self._writer.apply_page(
            run_id=run_id, tenant=tenant, scope=scope, page=page, accepted=accepted,
            rejections=rejections, checkpoint=checkpoint, normalised=normalised, now=now,
            rows=rows)

    def count_failed_ack(self, run_id: int) -> None:
        self._writer.count_failed_ack(run_id)

    def finish_run(self, run_id: int, *, status: RunStatus, now: datetime,
                   error: str | None = None) -> RunStats:
        return self._writer.finish_run(run_id, status=status, now=now, error=error)

    def close(self) -> None:
        self._writer.close()
