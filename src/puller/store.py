"""The SQL store: runs, checkpoints, and one transaction per page with newest-wins upserts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    Connection,
    Engine,
    Select,
    Table,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from puller import errors, merge, schema
from puller.domain import (
    Accepted,
    Checkpoint,
    PageOutcome,
    Rejection,
    RunStats,
    RunStatus,
    Scope,
)

SQLITE_BUSY_TIMEOUT_MS = 10_000


@dataclass(frozen=True, slots=True)
class ScopeStatus:
    """One row of `puller status`: the checkpoint and the last run of a (tenant, scope)."""

    tenant: str
    scope: str
    checkpoint: Checkpoint | None
    last_run: dict[str, Any] | None


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets status readers run beside the writer; synchronous=FULL fsyncs the WAL at
    # every commit, so a page that was acknowledged survives power loss (NORMAL would not).
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def create_store_engine(url: str) -> Engine:
    """An engine for `url`: SQLite (parent folder created, durable pragmas) or PostgreSQL."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed, json_serializer=_json, connect_args={"check_same_thread": False}
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(parsed, json_serializer=_json, pool_pre_ping=True)
    raise errors.StoreError(
        f"unsupported store URL scheme {parsed.drivername!r}; use sqlite:///PATH or "
        "postgresql+psycopg://USER@HOST/DB"
    )


class Store:
    """The only owner of database sessions."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._dialect = engine.dialect.name

    @classmethod
    def open(cls, url: str) -> Store:
        """Connect and create missing tables."""
        store = cls(create_store_engine(url))
        with store._begin() as conn:
            schema.metadata.create_all(conn)
        return store

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise errors.StoreError(
                f"{type(getattr(exc, 'orig', None) or exc).__name__}: {_first_line(exc)} — "
                "nothing of this step was written; check that the database is reachable "
                "and writable"
            ) from exc

    def start_run(self, tenant: str, scope: Scope, *, trigger: str, now: datetime) -> int:
        """Record a new run; earlier runs of this (tenant, scope) left `running` are abandoned."""
        with self._begin() as conn:
            conn.execute(
                update(schema.runs)
                .where(schema.runs.c.tenant_id == tenant, schema.runs.c.scope == scope.value,
                       schema.runs.c.status == "running")
                .values(status="abandoned", finished_at=now,
                        error="the process ended without finishing this run")
            )
            run_id = conn.execute(
                schema.runs.insert().returning(schema.runs.c.id).values(
                    tenant_id=tenant, scope=scope.value, trigger=trigger, status="running",
                    started_at=now, pages=0, accepted=0, rejected=0, stale=0, normalised=0,
                    acks_failed=0,
                )
            ).scalar_one()
            return int(run_id)

    def load_checkpoint(self, tenant: str, scope: Scope) -> Checkpoint:
        """Where the next run starts; a fresh sweep when none is stored."""
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
    ) -> PageOutcome:
        """Store a page in one transaction: records, rejections, run counters, checkpoint."""
        survivors, duplicates = merge.newest_per_id(accepted)
        with self._begin() as conn:
            applied = self._upsert(conn, tenant, scope, survivors, run_id=run_id, now=now)
            self._reject(conn, tenant, scope, run_id=run_id, page=page, rejections=rejections,
                         now=now)
            stale = duplicates + len(survivors) - applied
            self._count(conn, run_id, RunStats(pages=1, accepted=applied,
                                               rejected=len(rejections), stale=stale,
                                               normalised=normalised))
            self._checkpoint(conn, tenant, scope, checkpoint, run_id=run_id, now=now)
        return PageOutcome(applied=applied, stale=stale, rejected=len(rejections))

    def _upsert(
        self, conn: Connection, tenant: str, scope: Scope, records: Sequence[Accepted], *,
        run_id: int, now: datetime,
    ) -> int:
        if not records:
            return 0
        table = schema.RECORD_TABLES[scope.value]
        key = scope.id_field
        rows = [
            {"tenant_id": tenant, key: r.record_id, "last_modified_date": r.last_modified_at,
             "deleted_at": r.deleted_at, "run_id": run_id, "stored_at": now, **r.columns}
            for r in records
        ]
        insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        stmt = insert(table)
        # Full replacement, newest wins (SPEC §3): the WHERE is merge.is_newer in SQL.
        upsert = stmt.on_conflict_do_update(
            index_elements=[table.c.tenant_id, table.c[key]],
            set_={name: stmt.excluded[name] for name in rows[0] if name not in ("tenant_id", key)},
            where=table.c.last_modified_date < stmt.excluded.last_modified_date,
        ).returning(table.c[key])
        # RETURNING yields only rows inserted or updated, so stale ones are not counted;
        # rowcount cannot be used: psycopg reports -1 for executemany. SQLAlchemy batches
        # the rows into multi-row INSERT statements ("insertmanyvalues"), set-based.
        return len(conn.execute(upsert, rows).all())

    def _reject(
        self, conn: Connection, tenant: str, scope: Scope, *, run_id: int, page: str,
        rejections: Sequence[Rejection], now: datetime,
    ) -> None:
        if not rejections:
            return
        conn.execute(
            schema.rejected_records.insert(),
            [
                {"tenant_id": tenant, "scope": scope.value, "run_id": run_id, "page": page,
                 "position": r.position, "record": r.raw, "reasons": list(r.reasons),
                 "rejected_at": now}
                for r in rejections
            ],
        )

    def _count(self, conn: Connection, run_id: int, delta: RunStats) -> None:
        runs = schema.runs.c
        conn.execute(
            update(schema.runs)
            .where(runs.id == run_id)
            .values(pages=runs.pages + delta.pages, accepted=runs.accepted + delta.accepted,
                    rejected=runs.rejected + delta.rejected, stale=runs.stale + delta.stale,
                    normalised=runs.normalised + delta.normalised)
        )

    def _checkpoint(
        self, conn: Connection, tenant: str, scope: Scope, checkpoint: Checkpoint, *,
        run_id: int, now: datetime,
    ) -> None:
        table = schema.checkpoints
        values = {"next_number": checkpoint.next_number, "next_page": checkpoint.next_page,
                  "next_cursor": checkpoint.next_cursor, "run_id": run_id, "updated_at": now}
        insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        stmt = insert(table).values(tenant_id=tenant, scope=scope.value, **values)
        conn.execute(stmt.on_conflict_do_update(
            index_elements=[table.c.tenant_id, table.c.scope], set_=values
        ))

    def count_failed_ack(self, run_id: int) -> None:
        with self._begin() as conn:
            runs = schema.runs.c
            conn.execute(update(schema.runs).where(runs.id == run_id)
                         .values(acks_failed=runs.acks_failed + 1))

    def finish_run(
        self, run_id: int, *, status: RunStatus, now: datetime, error: str | None = None
    ) -> RunStats:
        """Close a run and return its counters as stored."""
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
        runs = schema.runs
        query = select(runs).order_by(runs.c.id.desc()).limit(limit)
        query = _filtered(query, runs, tenant_id=tenant, scope=scope, status=status)
        with self._begin() as conn:
            return [_plain(r._mapping) for r in conn.execute(query)]

    def list_rejects(self, *, tenant: str | None = None, scope: str | None = None,
                     run_id: int | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Rejected records with their reasons, newest first, optionally filtered."""
        rejected = schema.rejected_records
        query = select(rejected).order_by(rejected.c.id.desc()).limit(limit)
        query = _filtered(query, rejected, tenant_id=tenant, scope=scope, run_id=run_id)
        with self._begin() as conn:
            return [_plain(r._mapping) for r in conn.execute(query)]

    def count_records(self, tenant: str, scope: Scope) -> int:
        table = schema.RECORD_TABLES[scope.value]
        with self._begin() as conn:
            return int(conn.execute(
                select(func.count()).select_from(table).where(table.c.tenant_id == tenant)
            ).scalar_one())


def _plain(mapping: Any) -> dict[str, Any]:
    """A row as a dict with plain `str` keys (SQLAlchemy's quoted names are a str subclass)."""
    return {str(key): value for key, value in mapping.items()}


def _filtered(query: Select[Any], table: Table, **equal: object) -> Select[Any]:
    for column, value in equal.items():
        if value is not None:
            query = query.where(table.c[column] == value)
    return query


def _first_line(exc: SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig) if orig is not None else str(exc)
    return text.strip().splitlines()[0][:300] if text.strip() else "no detail"
