"""The SQL store: runs, checkpoints, and one transaction per page with newest-wins upserts."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from puller import (
    errors,
    forms,
    migration,
    pg_store,
    schema,
    sqlite_store,
    upsert,  # noqa: F401 - checks forms.LAYOUTS against schema.py at import
)
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
from puller.lease import LEASE_CLASS, Leases, worker_id
from puller.pg_store import SCHEMA_LOCK
from puller.protocol import json_text
from puller.sqlite_store import SQLITE_BUSY_TIMEOUT_MS, SqliteWriter, store_error

__all__ = ["SQLITE_BUSY_TIMEOUT_MS", "ScopeStatus", "Store", "create_store_engine"]
PG_POOL_SIZE = 10
PG_MAX_OVERFLOW = 40


@dataclass(frozen=True, slots=True)
class ScopeStatus:
    """One row of `puller status`: the checkpoint and the last run of a (tenant, scope)."""

    tenant: str
    scope: str
    checkpoint: Checkpoint | None
    last_run: dict[str, Any] | None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    sqlite_store.pragmas(dbapi_connection)


def create_store_engine(url: str) -> Engine:
    """An engine for `url`: SQLite (parent folder created, durable pragmas) or PostgreSQL."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            try:
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise store_error(exc) from exc
        engine = create_engine(
            parsed, json_serializer=json_text, connect_args={"check_same_thread": False}
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        # A run holds one connection for its lease and borrows one per page transaction.
        return create_engine(parsed, json_serializer=json_text, pool_pre_ping=True,
                             pool_size=PG_POOL_SIZE, max_overflow=PG_MAX_OVERFLOW)
    raise errors.StoreError(
        f"unsupported store URL scheme {parsed.drivername!r}; use sqlite:///PATH or "
        "postgresql+psycopg://USER@HOST/DB"
    )


class Store:
    """The only owner of database sessions."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._dialect = engine.dialect.name
        self._leases = Leases(engine)
        # SQLite: one writer connection, from the pool, taken in turn (SqliteWriter)
        self._sqlite = SqliteWriter(engine.raw_connection) if self._dialect == "sqlite" else None

    @classmethod
    def open(cls, url: str, *, check_schema: bool = True) -> Store:
        """Connect; a fresh empty database is brought to the current schema.

        Raises:
            errors.SchemaError: the schema is behind (or ahead of) this puller.
        """
        store = cls(create_store_engine(url))
        if check_schema:
            try:
                store.ensure_schema()
            except errors.StoreError:
                store.close()
                raise
        return store

    def ensure_schema(self) -> None:
        """Upgrade an empty database to head; refuse one whose revision is not head."""
        needed = migration.head()
        try:
            with self._begin() as conn:
                self._lock_schema(conn)
                if migration.is_empty(conn):
                    migration.create_head(conn)
                    return
                current = migration.current(conn)
        except errors.StoreError:
            # Another process created the schema at the same moment (SQLite); look again.
            with self._begin() as conn:
                current = migration.current(conn)
        if current != needed:
            raise errors.SchemaError(current=current, needed=needed)

    def schema_revision(self) -> tuple[str | None, str]:
        """(the database's revision, the revision this puller needs)."""
        with self._begin() as conn:
            return migration.current(conn), migration.head()

    def upgrade_schema(self) -> str:
        """`puller db upgrade`: bring the schema to head; returns the revision."""
        with self._begin() as conn:
            self._lock_schema(conn)
            migration.upgrade(conn)
            return migration.head()

    def _lock_schema(self, conn: Connection) -> None:
        if self._dialect == "postgresql":
            # Several workers starting on one empty database: one creates, the others wait.
            conn.execute(select(func.pg_advisory_xact_lock(LEASE_CLASS, SCHEMA_LOCK)))

    def lease(self, tenant: str, scope: Scope) -> AbstractContextManager[bool]:
        """Hold the (tenant, scope) lease for a run, if free (see lease.Leases)."""
        return self._leases.hold(tenant, scope)

    def claim_single_worker(self) -> None:
        """SQLite serves one worker: refuse a second worker process on the same file."""
        self._leases.claim_single_worker()

    def last_completed_start(self, tenant: str, scope: Scope) -> datetime | None:
        """When the latest run that completed (succeeded or failed) of a (tenant, scope) began."""
        runs = schema.runs
        with self._begin() as conn:
            return conn.execute(
                select(func.max(runs.c.started_at)).where(
                    runs.c.tenant_id == tenant, runs.c.scope == scope.value,
                    runs.c.status.in_(("succeeded", "failed")))
            ).scalar_one_or_none()

    @property
    def kept_connections(self) -> int:
        """Pooled connections the store keeps checked out between calls: SQLite's writer
        (SqliteWriter), once a write made it."""
        return 0 if self._sqlite is None else self._sqlite.kept_connections

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        self.engine.dispose()

    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise store_error(exc) from exc

    def start_run(self, tenant: str, scope: Scope, *, trigger: str, now: datetime) -> int:
        """Record a new run; earlier runs of this (tenant, scope) left `running` are abandoned."""
        if self._sqlite is not None:
            return self._sqlite.start_run(tenant, scope, trigger=trigger, now=now)
        with self._begin() as conn:
            conn.execute(
                update(schema.runs)
                .where(schema.runs.c.tenant_id == tenant, schema.runs.c.scope == scope.value,
                       schema.runs.c.status == "running")
                .values(status="abandoned", finished_at=now, error=sqlite_store.ABANDONED)
            )
            run_id = conn.execute(
                schema.runs.insert().returning(schema.runs.c.id).values(
                    tenant_id=tenant, scope=scope.value, trigger=trigger, status="running",
                    started_at=now, pages=0, accepted=0, rejected=0, stale=0, normalised=0,
                    acks_failed=0, worker=worker_id(),
                )
            ).scalar_one()
            return int(run_id)

    def load_checkpoint(self, tenant: str, scope: Scope) -> Checkpoint:
        """Where the next run starts; a fresh sweep when none is stored."""
        if self._sqlite is not None:
            return self._sqlite.load_checkpoint(tenant, scope)
        with self._begin() as conn:
            row = conn.execute(
                select(schema.checkpoints).where(
                    schema.checkpoints.c.tenant_id == tenant,
                    schema.checkpoints.c.scope == scope.value,
                )
            ).first()
        if row is None:
            return Checkpoint()
        return Checkpoint(row.next_number, row.next_page, row.next_cursor)

    def apply_page(
        self,
        *,
        run_id: int,
        tenant: str,
        scope: Scope,
        page: str,
        accepted: Sequence[Accepted],
        rejections: Sequence[Rejection],
        checkpoint: Checkpoint,
        normalised: int,
        now: datetime,
        rows: StoreRows | None = None,
    ) -> PageOutcome:
        """Store a page in one transaction: records, rejections, run counters, checkpoint.

        The records are `accepted`, or `rows` when they were put in this store's form
        already (the fetch process); the page statement adds `tenant`, `run_id` and `now`.
        """
        if self._sqlite is not None:
            return self._sqlite.apply_page(
                run_id=run_id, tenant=tenant, scope=scope, page=page, accepted=accepted,
                rejections=rejections, checkpoint=checkpoint, normalised=normalised, now=now,
                rows=rows)
        write = functools.partial(
            pg_store.write_page, rows=forms.page_rows(accepted, rows, scope, self._dialect),
            rejections=rejections, checkpoint=checkpoint, scope=scope, tenant=tenant,
            run_id=run_id, page=page, normalised=normalised, now=now)
        # On the run's lease connection's psycopg connection itself (autocommit: the one
        # statement is the page's transaction) when there is one: a lease lost with its
        # connection fails the write itself, so no page is written without the lease, at no
        # extra round trip; SQLAlchemy's execution context around it was ~30-70 µs a page
        # (5% of a pull with --fetch-process at page size 50, 6 interleaved rounds).
        leased = self._leases.connection(tenant, scope)
        if leased is None:  # a caller without the lease (tests, tools)
            with self._begin() as conn:
                driver: Any = conn.connection.driver_connection
                return write(driver)
        leased_driver: Any = leased.connection.driver_connection
        return write(leased_driver)

    def count_failed_ack(self, run_id: int) -> None:
        if self._sqlite is not None:
            self._sqlite.count_failed_ack(run_id)
            return
        with self._begin() as conn:
            runs = schema.runs.c
            conn.execute(update(schema.runs).where(runs.id == run_id)
                         .values(acks_failed=runs.acks_failed + 1))

    def finish_run(
        self, run_id: int, *, status: RunStatus, now: datetime, error: str | None = None
    ) -> RunStats:
        """Close a run and return its counters as stored. A NUL character in `error` (a
        tenant's own message can hold one) is stored as U+FFFD: PostgreSQL's text cannot
        hold it, and the run would stay open."""
        if self._sqlite is not None:
            return self._sqlite.finish_run(run_id, status=status, now=now, error=error)
        error = forms.stored_error(error)
        with self._begin() as conn:
            conn.execute(update(schema.runs).where(schema.runs.c.id == run_id)
                         .values(status=status, finished_at=now, error=error))
            row = conn.execute(select(schema.runs).where(schema.runs.c.id == run_id)).one()
        return RunStats(pages=row.pages, accepted=row.accepted, rejected=row.rejected,
                        stale=row.stale, normalised=row.normalised, acks_failed=row.acks_failed)

    def status(self, tenants: Sequence[tuple[str, Scope]]) -> list[ScopeStatus]:
        """Checkpoint and last run of each (tenant, scope) named."""
        out = []
        with self._begin() as conn:
            for tenant, scope in tenants:
                cp = conn.execute(select(schema.checkpoints).where(
                    schema.checkpoints.c.tenant_id == tenant,
                    schema.checkpoints.c.scope == scope.value)).first()
                last = conn.execute(
                    select(schema.runs)
                    .where(schema.runs.c.tenant_id == tenant, schema.runs.c.scope == scope.value)
                    .order_by(schema.runs.c.id.desc()).limit(1)
                ).first()
                out.append(ScopeStatus(
                    tenant=tenant, scope=scope.value,
                    checkpoint=Checkpoint(cp.next_number, cp.next_page, cp.next_cursor)
                    if cp else None,
                    last_run=_plain(last._mapping) if last else None,
                ))
        return out

    def purge(self, *, now: datetime, soft_deleted_s: float, rejected_s: float,
              runs_s: float) -> dict[str, int]:
        """Delete soft-deleted records, rejected records and finished runs past retention."""
        removed: dict[str, int] = {}
        with self._begin() as conn:
            for scope, table in schema.RECORD_TABLES.items():
                cutoff = now - timedelta(seconds=soft_deleted_s)
                removed[scope] = conn.execute(
                    delete(table).where(table.c.deleted_at.is_not(None),
                                        table.c.deleted_at < cutoff)).rowcount
            rejected = schema.rejected_records
            removed["rejected"] = conn.execute(delete(rejected).where(
                rejected.c.rejected_at < now - timedelta(seconds=rejected_s))).rowcount
            runs = schema.runs
            removed["runs"] = conn.execute(delete(runs).where(
                runs.c.status != "running", runs.c.started_at < now - timedelta(seconds=runs_s),
            )).rowcount
        return removed

    def forget_customer(self, tenant: str, customer_id: str) -> dict[str, int]:
        """Erase one customer's personal data now: the customer row and rejected records
        (of any scope) that carry this customer id."""
        customers, rejected = schema.customers, schema.rejected_records
        with self._begin() as conn:
            rows = conn.execute(delete(customers).where(
                customers.c.tenant_id == tenant, customers.c.customer_id == customer_id,
            )).rowcount
            rejects = conn.execute(delete(rejected).where(
                rejected.c.tenant_id == tenant,
                rejected.c.record["customer_id"].as_string() == customer_id,
            )).rowcount
        return {"customers": rows, "rejected": rejects}

    def list_runs(self, *, tenant: str | None = None, scope: str | None = None,
                  status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Recent runs, newest first, optionally filtered."""
        return self._newest(schema.runs, limit, tenant_id=tenant, scope=scope, status=status)

    def list_rejects(self, *, tenant: str | None = None, scope: str | None = None,
                     run_id: int | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Rejected records with their reasons, newest first, optionally filtered."""
        return self._newest(schema.rejected_records, limit, tenant_id=tenant, scope=scope,
                            run_id=run_id)

    def _newest(self, table: Table, limit: int, **equal: object) -> list[dict[str, Any]]:
        query = select(table).order_by(table.c.id.desc()).limit(limit)
        for column, value in equal.items():
            if value is not None:
                query = query.where(table.c[column] == value)
        with self._begin() as conn:
            return [_plain(r._mapping) for r in conn.execute(query)]

    def count_records(self, tenant: str, scope: Scope) -> int:
        table = schema.RECORD_TABLES[scope.value]
        with self._begin() as conn:
            return int(conn.execute(
                select(func.count()).select_from(table).where(table.c.tenant_id == tenant)
            ).scalar_one())


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN")


def _plain(mapping: Any) -> dict[str, Any]:
    """A row as a dict with plain `str` keys (SQLAlchemy's quoted names are a str subclass)."""
    return {str(key): value for key, value in mapping.items()}

