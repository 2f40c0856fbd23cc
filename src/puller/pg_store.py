"""PostgreSQL's store for `puller pull` without SQLAlchemy (issue #5), as sqlite_store.py
is SQLite's: the page statement, a run's own rows, the leases (advisory locks) and a
fresh database's schema, on psycopg's connections.

A pull into PostgreSQL imported SQLAlchemy to open the store (0.18 s, then its engine and
psycopg 0.055 s): the store was open 0.28 s after the fetch process's fork, which was
ready at 0.13 s. psycopg alone imports in ~60 ms. `store.Store` keeps SQLAlchemy for every
other command, and builds its page statement here too.
"""

from __future__ import annotations

import functools
import threading
import zlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from datetime import UTC, datetime
from functools import cache
from typing import TYPE_CHECKING, Any

from puller import errors, forms
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
from puller.file_leases import worker_id
from puller.forms import LAYOUTS, PG_KEYS, record_columns
from puller.protocol import json_text
from puller.sqlite_schema import SCHEMA_HEAD
from puller.sqlite_store import (
    ABANDONED,
    CHECKPOINT_UPSERT,
    TABLES,
    store_error,
    upsert_clause,
)

if TYPE_CHECKING:
    import psycopg

LEASE_CLASS = 0x70756C6C  # "pull": the first key of puller's PostgreSQL advisory locks
SCHEMA_LOCK = 1  # second key of the advisory lock that serialises schema upgrades
TIMES = ("last_modified_date", "deleted_at")
"""A record table's timestamptz columns from the page (store.Store checks them)."""
_FROM_PAGE = ("tenant_id", "run_id", "stored_at")  # bound once per page, not per row


@cache
def start_statement(scope: Scope) -> str:
    """A run's start: the run's row, `running`, a run of this (tenant, scope) left `running`
    marked abandoned; it returns the run's id and whether the scope's table holds no record
    of the tenant yet (PgStore._first_load)."""
    return (  # constant text and puller's identifiers only; every value is bound
        "WITH abandoned AS (UPDATE runs SET status = 'abandoned', finished_at = %s, "  # noqa: S608
        "error = %s WHERE tenant_id = %s AND scope = %s AND status = 'running') "
        "INSERT INTO runs (tenant_id, scope, trigger, status, started_at, pages, accepted, "
        "rejected, stale, normalised, acks_failed, worker) VALUES "
        "(%s, %s, %s, 'running', %s, 0, 0, 0, 0, 0, 0, %s) RETURNING id, "
        f'NOT EXISTS (SELECT 1 FROM "{TABLES[scope]}" WHERE tenant_id = %s)'
    )


def _first_row(cursor: psycopg.Cursor[Any]) -> tuple[Any, ...] | None:
    """The statement's first row; None for one that returns no rows."""
    return None if cursor.description is None else cursor.fetchone()


def lease_key(tenant: str, scope: Scope) -> int:
    # pg advisory locks take two int4 keys; crc32 folded to a signed int. A collision only
    # makes two (tenant, scope) pairs take turns, never run at once.
    value = zlib.crc32(f"{tenant}\x00{scope.value}".encode())
    return value - 2**32 if value >= 2**31 else value


def conninfo(url: str) -> str | None:
    """libpq's URI for a postgresql[+psycopg]:// store URL without query options (the
    same user, password, host, port and database: both decode %-escapes); None for any
    other URL, which SQLAlchemy reads (store.Store)."""
    scheme, found, rest = url.partition("://")
    if not found or scheme not in ("postgresql", "postgresql+psycopg") or "?" in rest:
        return None
    return f"postgresql://{rest}"


# ---------------------------------------------------------------- the page statement
def _column_type(scope: Scope, name: str) -> str:
    if name in LAYOUTS[scope][1]:
        return "jsonb"
    return "timestamptz" if name in TIMES else "text"


@cache
def record_statement(scope: Scope, *, first_load: bool = False) -> str:
    """The page upsert: INSERT … SELECT FROM the page document (forms.pg_document, keyed
    by forms.PG_KEYS) … ON CONFLICT DO UPDATE … WHERE newer, RETURNING the id.
    `first_load`: a plain INSERT, without the ON CONFLICT clause (PgStore._first_load)."""
    table, key = TABLES[scope], scope.id_field
    names = ["tenant_id", *record_columns(scope), "run_id", "stored_at"]
    keys = PG_KEYS[scope]  # the document's key of each column
    picks, fields = [], []
    for name in names:
        if name in _FROM_PAGE:
            picks.append(f"%({name})s")
            continue
        picks.append(f'r."{keys[name]}"')
        fields.append(f'"{keys[name]}" {_column_type(scope, name)}')
    source = (f"SELECT {', '.join(picks)} FROM jsonb_to_recordset(%(doc)s::jsonb) "  # noqa: S608
              f"AS r({', '.join(fields)})")
    quoted = ", ".join(f'"{n}"' for n in names)
    # Identifiers are puller's own, never from input; every value is a bound parameter.
    upsert = "" if first_load else f"{upsert_clause(table, names, key)} "
    return f'INSERT INTO "{table}" ({quoted}) {source} {upsert}RETURNING "{key}"'


@cache
def page_statement(scope: Scope, *, rejects: bool, first_load: bool = False) -> str:
    """One PostgreSQL statement for a whole page: upsert the records, insert the rejections
    (`rejects`: the page has some), add to the run's counters (stale = offered - applied),
    move the checkpoint. Run alone, in autocommit, it is one transaction and one round trip;
    it returns the applied count. Without rejections the statement has no insert into
    rejected_records: at page size 50 that part alone was ~8% of PostgreSQL's CPU and ~10%
    of the statements' time, though it inserted nothing. `first_load`: the records by a
    plain INSERT (record_statement)."""
    rejected = (
        "rej AS (INSERT INTO rejected_records (tenant_id, scope, run_id, page, position, "
        "record, reasons, rejected_at) SELECT %(tenant_id)s, %(scope)s, %(run_id)s, %(page)s, "
        "j.position, j.record, j.reasons, %(stored_at)s "
        "FROM jsonb_to_recordset(%(rejects)s::jsonb) AS j(position int, record jsonb, "
        "reasons jsonb)), "
    ) if rejects else ""
    return (  # constant text and puller's identifiers only; every value is bound
        f"WITH up AS ({record_statement(scope, first_load=first_load)}), {rejected}"  # noqa: S608
        "n AS (SELECT count(*) AS applied FROM up), "
        "cnt AS (UPDATE runs SET pages = pages + 1, accepted = accepted + n.applied, "
        "rejected = rejected + %(rejected)s, stale = stale + %(offered)s - n.applied, "
        "normalised = normalised + %(normalised)s FROM n WHERE runs.id = %(run_id)s), "
        "cp AS (INSERT INTO checkpoints (tenant_id, scope, next_number, next_page, next_cursor, "
        "run_id, updated_at) VALUES (%(tenant_id)s, %(scope)s, %(next_number)s, %(next_page)s, "
        f"%(next_cursor)s, %(run_id)s, %(stored_at)s) {CHECKPOINT_UPSERT}) "
        "SELECT applied FROM n"
    )


def page_params(document: str, rejections: Sequence[Rejection],
                checkpoint: Checkpoint, scope: Scope, *, tenant: str, run_id: int,
                page: str, offered: int, normalised: int, now: datetime) -> dict[str, Any]:
    """The parameters of page_statement; `document` from forms.pg_document."""
    params: dict[str, Any] = dict(
        doc=document, tenant_id=tenant, run_id=run_id, stored_at=now.astimezone(UTC).isoformat(),
        scope=scope.value, page=page, offered=offered, rejected=len(rejections),
        normalised=normalised, next_number=checkpoint.next_number,
        next_page=checkpoint.next_page, next_cursor=checkpoint.next_cursor,
    )
    if rejections:
        params["rejects"] = json_text([
            {"position": r.position, "record": r.raw, "reasons": list(r.reasons)}
            for r in rejections])
    return params


class KeyStored(Exception):
    """A first-load page statement met a record already stored (write_page); it wrote
    nothing."""


def write_page(
    conn: psycopg.Connection[Any], *, rows: StoreRows, rejections: Sequence[Rejection],
    checkpoint: Checkpoint, scope: Scope, tenant: str, run_id: int, page: str,
    normalised: int, now: datetime, first_load: bool = False,
) -> PageOutcome:
    """The page statement on a psycopg connection: in autocommit, the page's transaction.

    Raises:
        KeyStored: `first_load` (only in autocommit), and a record of the page is stored
            already; the statement's transaction wrote nothing, write the page without it.
    """
    import psycopg  # noqa: PLC0415 - the caller has it loaded already

    offered = rows.survivors + rows.duplicates  # every accepted record not applied is stale
    params = page_params(rows.payload, rejections, checkpoint, scope, tenant=tenant,
                         run_id=run_id, page=page, offered=offered, normalised=normalised,
                         now=now)
    statement = page_statement(scope, rejects=bool(rejections), first_load=first_load)
    try:
        row = conn.execute(statement, params).fetchone()
    except psycopg.errors.UniqueViolation as exc:
        if first_load and exc.diag.table_name == TABLES[scope]:  # its only unique key
            raise KeyStored from exc
        raise store_error(exc) from exc
    except psycopg.Error as exc:
        raise store_error(exc) from exc
    assert row is not None  # the statement always returns its one count row
    applied = int(row[0])
    return PageOutcome(applied=applied, stale=offered - applied, rejected=len(rejections))


# ---------------------------------------------------------------- the schema
SCHEMA = (
    "CREATE TABLE customers (\n\ttenant_id VARCHAR(64) NOT NULL, \n\tcustomer_id VARCHAR(100) "
    "NOT NULL, \n\temail VARCHAR(255) NOT NULL, \n\tfirst_name VARCHAR(100) NOT NULL, "
    "\n\tlast_name VARCHAR(300) NOT NULL, \n\tmobile VARCHAR(20) NOT NULL, \n\tlanguage "
    "VARCHAR(10) NOT NULL, \n\tconsent VARCHAR(3) NOT NULL, \n\tgender VARCHAR(6) NOT NULL, "
    "\n\textra JSONB NOT NULL, \n\tlast_modified_date TIMESTAMP WITH TIME ZONE NOT NULL, "
    "\n\tdeleted_at TIMESTAMP WITH TIME ZONE, \n\trun_id BIGINT NOT NULL, \n\tstored_at "
    "TIMESTAMP WITH TIME ZONE NOT NULL, \n\tPRIMARY KEY (tenant_id, customer_id)\n)",
    "CREATE INDEX ix_customers_deleted_at ON customers (deleted_at) WHERE deleted_at IS NOT "
    "NULL",
    "CREATE TABLE orders (\n\ttenant_id VARCHAR(64) NOT NULL, \n\torder_id VARCHAR(100) NOT "
    "NULL, \n\tcustomer_id VARCHAR(100) NOT NULL, \n\tpayload JSONB NOT NULL, "
    "\n\tlast_modified_date TIMESTAMP WITH TIME ZONE NOT NULL, \n\tdeleted_at TIMESTAMP WITH "
    "TIME ZONE, \n\trun_id BIGINT NOT NULL, \n\tstored_at TIMESTAMP WITH TIME ZONE NOT NULL, "
    "\n\tPRIMARY KEY (tenant_id, order_id)\n)",
    "CREATE INDEX ix_orders_deleted_at ON orders (deleted_at) WHERE deleted_at IS NOT NULL",
    "CREATE TABLE products (\n\ttenant_id VARCHAR(64) NOT NULL, \n\tproduct_id VARCHAR(100) "
    "NOT NULL, \n\tpayload JSONB NOT NULL, \n\tlast_modified_date TIMESTAMP WITH TIME ZONE NOT "
    "NULL, \n\tdeleted_at TIMESTAMP WITH TIME ZONE, \n\trun_id BIGINT NOT NULL, \n\tstored_at "
    "TIMESTAMP WITH TIME ZONE NOT NULL, \n\tPRIMARY KEY (tenant_id, product_id)\n)",
    "CREATE INDEX ix_products_deleted_at ON products (deleted_at) WHERE deleted_at IS NOT "
    "NULL",
    "CREATE TABLE rejected_records (\n\tid BIGSERIAL NOT NULL, \n\ttenant_id VARCHAR(64) NOT "
    "NULL, \n\tscope VARCHAR(16) NOT NULL, \n\trun_id BIGINT NOT NULL, \n\tpage VARCHAR(200) "
    "NOT NULL, \n\tposition INTEGER NOT NULL, \n\trecord JSONB NOT NULL, \n\treasons JSONB NOT "
    "NULL, \n\trejected_at TIMESTAMP WITH TIME ZONE NOT NULL, \n\tPRIMARY KEY (id)\n)",
    "CREATE INDEX ix_rejected_rejected_at ON rejected_records (rejected_at)",
    "CREATE INDEX ix_rejected_tenant_scope_run ON rejected_records (tenant_id, scope, run_id)",
    "CREATE TABLE checkpoints (\n\ttenant_id VARCHAR(64) NOT NULL, \n\tscope VARCHAR(16) NOT "
    "NULL, \n\tnext_number INTEGER NOT NULL, \n\tnext_page INTEGER, \n\tnext_cursor TEXT, "
    "\n\trun_id BIGINT NOT NULL, \n\tupdated_at TIMESTAMP WITH TIME ZONE NOT NULL, \n\tPRIMARY "
    "KEY (tenant_id, scope)\n)",
    "CREATE TABLE runs (\n\tid BIGSERIAL NOT NULL, \n\ttenant_id VARCHAR(64) NOT NULL, "
    "\n\tscope VARCHAR(16) NOT NULL, \n\ttrigger VARCHAR(16) NOT NULL, \n\tstatus VARCHAR(16) "
    "NOT NULL, \n\tstarted_at TIMESTAMP WITH TIME ZONE NOT NULL, \n\tfinished_at TIMESTAMP "
    "WITH TIME ZONE, \n\tpages INTEGER NOT NULL, \n\taccepted INTEGER NOT NULL, \n\trejected "
    "INTEGER NOT NULL, \n\tstale INTEGER NOT NULL, \n\tnormalised INTEGER NOT NULL, "
    "\n\tacks_failed INTEGER NOT NULL, \n\terror TEXT, \n\tworker VARCHAR(100), \n\tPRIMARY "
    "KEY (id)\n)",
    "CREATE INDEX ix_runs_tenant_scope_started ON runs (tenant_id, scope, started_at)",
    "CREATE TABLE alembic_version (\n\tversion_num VARCHAR(32) NOT NULL, \n\tCONSTRAINT "
    "alembic_version_pkc PRIMARY KEY (version_num)\n)",
)
"""A fresh database's schema at SCHEMA_HEAD, as migration.create_head builds it from
schema.py on PostgreSQL (the SQL SQLAlchemy emits; a test checks that both build the same
tables, columns, keys, indexes and revision)."""


# ---------------------------------------------------------------- the pull's store
class PgStore:
    """pipeline.PageSink on PostgreSQL without SQLAlchemy: what `puller pull` needs. A
    run's lease is a session advisory lock on a connection of its own, on which the run
    starts and its pages are written (a lease lost with its connection fails the write
    itself); connections are kept for the next run (the server starts a process for each
    new one). A run's finish, a failed acknowledgement, and anything without a lease
    (tests, tools) go through one more connection, taken in turn.

    A first load: when a run starts (with its lease) and the scope's table holds no record
    of the tenant, its pages' records are written by a plain INSERT, not an upsert, until a
    record is met that is stored already (a record served twice in the run): that page's
    statement fails on the primary key having written nothing (PostgreSQL logs the error),
    and from that page on the run's pages are upserted as always. The upsert's conflict
    check is a quarter of PostgreSQL's CPU for a page of new records (200 pages of 500 customers:
    0.75 s against 0.95 s of statements, 3 rounds), and one tenant's pages are one chain of
    statements in the server: a first pull of 100,000 customers with --fetch-process took
    1.36 s against 1.60 s at page size 500 (medians of 4 interleaved rounds), 2.29 against
    2.78 s at 50 (3). docs/performance-log.md, 2026-11-28 (07:24-)."""

    def __init__(self, info: str) -> None:
        import psycopg  # noqa: PLC0415 - only a pull into PostgreSQL needs it

        self._psycopg = psycopg
        self._info = info
        self._held: dict[tuple[str, str], psycopg.Connection[Any]] = {}
        self._first_load: set[tuple[str, str]] = set()
        self._idle: list[psycopg.Connection[Any]] = []
        self._pool_lock = threading.Lock()
        self._books_lock = threading.Lock()
        try:
            self._books = psycopg.connect(info, autocommit=True)
        except psycopg.Error as exc:
            raise store_error(exc) from exc

    @classmethod
    def open(cls, info: str) -> PgStore:
        """Connect; a fresh empty database is brought to the current schema.

        Raises:
            errors.SchemaError: the schema is behind (or ahead of) this puller.
        """
        store = cls(info)
        try:
            store._ensure_schema()
        except errors.StoreError:
            store.close()
            raise
        return store

    @contextmanager
    def _books_tx(self) -> Iterator[psycopg.Connection[Any]]:
        """A transaction of several statements on the shared connection, in turn."""
        try:
            with self._books_lock, self._books.transaction():
                yield self._books
        except self._psycopg.Error as exc:
            raise store_error(exc) from exc

    def _one(self, sql: str, params: Sequence[Any], name: tuple[str, str] | None = None
             ) -> tuple[Any, ...] | None:
        """One statement, in autocommit its own transaction and one round trip, on the
        lease's connection of (tenant, scope) `name` if held here, else on the shared one
        in turn; its first row. A sweep's bookkeeping is a statement each (its run's start,
        its checkpoint, its run's finish): as transactions of two statements or one, with
        BEGIN and COMMIT, they were 11 round trips, now 3 (with the lease's lock and
        unlock, 5 a sweep)."""
        leased = None if name is None else self._held.get(name)
        try:
            if leased is not None:
                return _first_row(leased.execute(sql, params))
            with self._books_lock:
                return _first_row(self._books.execute(sql, params))
        except self._psycopg.Error as exc:
            raise store_error(exc) from exc

    def _ensure_schema(self) -> None:
        """As store.Store.ensure_schema: several pulls starting on one empty database take
        turns (advisory lock); one creates, the others find it."""
        with self._books_tx() as db:
            db.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LEASE_CLASS, SCHEMA_LOCK))
            has_version = db.execute("SELECT to_regclass('alembic_version') IS NOT NULL"
                                     ).fetchone()
            current = None
            if has_version is not None and has_version[0]:
                row = db.execute("SELECT version_num FROM alembic_version").fetchone()
                current = None if row is None else str(row[0])
            has_runs = db.execute("SELECT to_regclass('runs') IS NOT NULL").fetchone()
            if current is None and not (has_runs is not None and has_runs[0]):
                for ddl in SCHEMA:
                    db.execute(ddl)
                db.execute("INSERT INTO alembic_version (version_num) VALUES (%s)",
                           (SCHEMA_HEAD,))
                return
        if current != SCHEMA_HEAD:
            raise errors.SchemaError(current=current, needed=SCHEMA_HEAD)

    @contextmanager
    def _lease(self, tenant: str, scope: Scope) -> Iterator[bool]:
        psycopg = self._psycopg
        name, key = (tenant, scope.value), lease_key(tenant, scope)
        with self._pool_lock:
            conn = self._idle.pop() if self._idle else None
        try:
            if conn is None:
                conn = psycopg.connect(self._info, autocommit=True)
            found = conn.execute("SELECT pg_try_advisory_lock(%s, %s)",
                                 (LEASE_CLASS, key)).fetchone()
        except psycopg.Error as exc:
            if conn is not None:
                with suppress(psycopg.Error):
                    conn.close()
            raise errors.StoreError(f"cannot take a lease: {store_error(exc)}") from exc
        held = bool(found and found[0])
        if held:
            self._held[name] = conn
        try:
            yield held
        finally:
            self._held.pop(name, None)
            self._first_load.discard(name)
            kept = False
            with suppress(psycopg.Error):  # a dead connection took its lock with it
                if held:
                    conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LEASE_CLASS, key))
                kept = not conn.closed
            if kept:
                with self._pool_lock:
                    self._idle.append(conn)
            else:
                with suppress(psycopg.Error):
                    conn.close()

    def lease(self, tenant: str, scope: Scope) -> AbstractContextManager[bool]:
        return self._lease(tenant, scope)

    def last_completed_start(self, tenant: str, scope: Scope) -> datetime | None:
        row = self._one("SELECT max(started_at) FROM runs WHERE tenant_id = %s AND scope = %s "
                        "AND status IN ('succeeded', 'failed')", (tenant, scope.value))
        found = None if row is None else row[0]
        return None if found is None else found.astimezone(UTC)

    def start_run(self, tenant: str, scope: Scope, *, trigger: str, now: datetime) -> int:
        """The run's row, `running`; a run of this (tenant, scope) left `running` (its
        process gone, its lease with it) is marked abandoned in the same statement."""
        name = (tenant, scope.value)
        row = self._one(start_statement(scope), (now, ABANDONED, tenant, scope.value, tenant,
                                                 scope.value, trigger, now, worker_id(),
                                                 tenant), name)
        assert row is not None  # an INSERT … RETURNING's row
        if row[1] and name in self._held:
            self._first_load.add(name)
        return int(row[0])

    def load_checkpoint(self, tenant: str, scope: Scope) -> Checkpoint:
        row = self._one("SELECT next_number, next_page, next_cursor FROM checkpoints "
                        "WHERE tenant_id = %s AND scope = %s", (tenant, scope.value),
                        (tenant, scope.value))
        return Checkpoint() if row is None else Checkpoint(*row)

    def apply_page(
        self, *, run_id: int, tenant: str, scope: Scope, page: str,
        accepted: Sequence[Accepted], rejections: Sequence[Rejection], checkpoint: Checkpoint,
        normalised: int, now: datetime, rows: StoreRows | None = None,
    ) -> PageOutcome:
        write = functools.partial(
            write_page, rows=forms.page_rows(accepted, rows, scope, "postgresql"),
            rejections=rejections, checkpoint=checkpoint, scope=scope, tenant=tenant,
            run_id=run_id, page=page, normalised=normalised, now=now)
        name = (tenant, scope.value)
        leased = self._held.get(name)
        if leased is not None:
            if name in self._first_load:
                try:
                    return write(leased, first_load=True)
                except KeyStored:  # a record served twice in the run: upsert from here on
                    self._first_load.discard(name)
            return write(leased)
        with self._books_lock:  # a caller without the lease (tests, tools)
            return write(self._books)

    def count_failed_ack(self, run_id: int) -> None:
        self._one("UPDATE runs SET acks_failed = acks_failed + 1 WHERE id = %s", (run_id,))

    def finish_run(self, run_id: int, *, status: RunStatus, now: datetime,
                   error: str | None = None) -> RunStats:
        # On the shared connection: a run that failed because its lease's connection was
        # lost is still recorded as failed, with its error.
        row = self._one("UPDATE runs SET status = %s, finished_at = %s, error = %s "
                        "WHERE id = %s RETURNING pages, accepted, rejected, stale, "
                        "normalised, acks_failed",
                        (status, now, forms.stored_error(error), run_id))
        if row is None:
            raise errors.StoreError(f"run {run_id} is no longer in the store: it was "
                                    "deleted while it ran; its pages are stored, and the "
                                    "next run resumes at the checkpoint")
        return RunStats(*row)

    def close(self) -> None:
        with self._pool_lock:
            idle, self._idle = self._idle, []
        for conn in [*idle, self._books]:
            with suppress(self._psycopg.Error):
                conn.close()
