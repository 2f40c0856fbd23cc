"""A page's writes, newest wins in SQL, built for each dialect's fastest path (issue #5).

SQLAlchemy's per-row parameter processing cost ~20 µs a record, and its statement
machinery ~60 µs per bookkeeping statement. PostgreSQL gets the whole page (records,
rejections, run counters, checkpoint) as one statement of data-modifying CTEs with the
records as one JSON parameter (`jsonb_to_recordset`): one round trip, one transaction.
SQLite gets the rows' values as multi-row VALUES, a few statements a page, with the
tenant, the run and the time bound once a statement (sqlite_upsert; `executemany`, one
execution a row, cost SQLite 20% more CPU; `json_each` re-parsed each row per column and
was slower still) and three more statements on the driver connection, inside one BEGIN …
COMMIT. The records' rows and document are built in forms.py, which imports no
SQLAlchemy (the fetch process builds them).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cache
from typing import Any

from sqlalchemy import JSON, Table

from puller import schema
from puller.domain import Checkpoint, Rejection, Scope
from puller.forms import LAYOUTS, NO_TIME, PG_KEYS, record_columns, sqlite_time, sqlite_width
from puller.protocol import json_text

_FROM_PAGE = ("tenant_id", "run_id", "stored_at")  # bound once per page, not per row


@cache
def statement(scope: Scope, dialect: str, rows: int = 1) -> str:
    """The page upsert: ON CONFLICT DO UPDATE … WHERE newer (merge.is_newer in SQL), full
    replacement. PostgreSQL: INSERT … SELECT FROM the page document RETURNING the id.
    SQLite: INSERT … SELECT FROM (VALUES (?, …), (?, …) …) for `rows` rows of
    forms.sqlite_rows, with the tenant, the run and the time as ?1, ?2 and ?3, and
    forms.NO_TIME as ?4 (a deleted_at of that value is stored as NULL); applied rows
    counted by total_changes."""
    table = schema.RECORD_TABLES[scope.value]
    key = scope.id_field
    names = [c.name for c in table.columns]
    quoted = {n: f'"{n}"' for n in names}
    updates = ", ".join(f"{quoted[n]} = excluded.{quoted[n]}" for n in names
                        if n not in ("tenant_id", key))
    if dialect == "sqlite":
        source, returning = _sqlite_source(scope, rows), ""
    else:
        source, returning = _pg_source(table, scope), f" RETURNING {quoted[key]}"
    # Identifiers come from schema.py, never from input; every value is a bound parameter.
    return (
        f'INSERT INTO "{table.name}" ({", ".join(quoted.values())}) {source} '
        f'ON CONFLICT ("tenant_id", {quoted[key]}) DO UPDATE SET {updates} '
        f'WHERE "{table.name}"."last_modified_date" < excluded."last_modified_date"'
        f"{returning}"
    )


def _sqlite_source(scope: Scope, rows: int) -> str:
    # A VALUES subquery's columns are column1, column2, …; a "?" after ?4 is ?5, and so on.
    # `WHERE true` tells SQLite's parser that ON CONFLICT starts the upsert, not a join.
    width = sqlite_width(scope)
    picks = ["?1", *[f"column{n}" for n in range(1, width)], f"NULLIF(column{width}, ?4)",
             "?2", "?3"]
    row = f"({', '.join('?' * width)})"
    return (f"SELECT {', '.join(picks)} FROM (VALUES {', '.join([row] * rows)}) "  # noqa: S608
            "WHERE true")


SQLITE_BLOCK_ROWS = 512
"""The most rows one SQLite upsert statement takes (fewer where SQLite allows fewer
variables): blocks are powers of two, so a few statements of each scope are prepared."""


def sqlite_upsert(db: sqlite3.Connection, scope: Scope, values: list[str], *,
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
    block = 1 << (min(SQLITE_BLOCK_ROWS, room // width).bit_length() - 1)
    at = 0
    while at < count:
        while block > count - at:
            block //= 2
        db.execute(statement(scope, "sqlite", block),
                   page + values[at * width:(at + block) * width])
        at += block


SQLITE_REJECT = (
    "INSERT INTO rejected_records (tenant_id, scope, run_id, page, position, record, reasons, "
    "rejected_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
SQLITE_COUNT = (
    "UPDATE runs SET pages = pages + 1, accepted = accepted + ?, rejected = rejected + ?, "
    "stale = stale + ?, normalised = normalised + ? WHERE id = ?"
)
_CHECKPOINT_UPSERT = (
    "ON CONFLICT (tenant_id, scope) DO UPDATE SET next_number = excluded.next_number, "
    "next_page = excluded.next_page, next_cursor = excluded.next_cursor, "
    "run_id = excluded.run_id, updated_at = excluded.updated_at"
)
# Only constant text is joined into SQL here and below; every value is a bound parameter.
SQLITE_CHECKPOINT = (
    "INSERT INTO checkpoints (tenant_id, scope, next_number, next_page, next_cursor, run_id, "  # noqa: S608
    f"updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) {_CHECKPOINT_UPSERT}"
)


# A run's own rows on SQLite, on the driver connection as the page's statements: through
# SQLAlchemy's statement machinery, starting a run, reading its checkpoint and finishing it
# cost ~1.7 ms of CPU a sweep, which a pull of many small tenants pays for each.
SQLITE_ABANDON = (
    "UPDATE runs SET status = 'abandoned', finished_at = ?, error = ? "
    "WHERE tenant_id = ? AND scope = ? AND status = 'running'"
)
SQLITE_START_RUN = (
    "INSERT INTO runs (tenant_id, scope, trigger, status, started_at, pages, accepted, "
    "rejected, stale, normalised, acks_failed, worker) "
    "VALUES (?, ?, ?, 'running', ?, 0, 0, 0, 0, 0, 0, ?)"
)
SQLITE_FINISH_RUN = "UPDATE runs SET status = ?, finished_at = ?, error = ? WHERE id = ?"
SQLITE_RUN_STATS = (
    "SELECT pages, accepted, rejected, stale, normalised, acks_failed FROM runs WHERE id = ?"
)
SQLITE_LOAD_CHECKPOINT = (
    "SELECT next_number, next_page, next_cursor FROM checkpoints "
    "WHERE tenant_id = ? AND scope = ?"
)


def sqlite_rejections(rejections: Sequence[Rejection], scope: Scope, *, tenant: str,
                      run_id: int, page: str, now: datetime) -> list[tuple[Any, ...]]:
    """Rejected records as SQLITE_REJECT rows."""
    at = sqlite_time(now)
    return [(tenant, scope.value, run_id, page, r.position, json_text(r.raw),
             json_text(list(r.reasons)), at) for r in rejections]


def sqlite_checkpoint(checkpoint: Checkpoint, scope: Scope, *, tenant: str, run_id: int,
                      now: datetime) -> tuple[Any, ...]:
    """The SQLITE_CHECKPOINT row."""
    return (tenant, scope.value, checkpoint.next_number, checkpoint.next_page,
            checkpoint.next_cursor, run_id, sqlite_time(now))


@cache
def pg_page_statement(scope: Scope, *, rejects: bool) -> str:
    """One PostgreSQL statement for a whole page: upsert the records, insert the rejections
    (`rejects`: the page has some), add to the run's counters (stale = offered - applied),
    move the checkpoint. Run alone, in autocommit, it is one transaction and one round trip;
    it returns the applied count. Without rejections the statement has no insert into
    rejected_records: at page size 50 that part alone was ~8% of PostgreSQL's CPU and ~10%
    of the statements' time, though it inserted nothing."""
    rejected = (
        "rej AS (INSERT INTO rejected_records (tenant_id, scope, run_id, page, position, "
        "record, reasons, rejected_at) SELECT %(tenant_id)s, %(scope)s, %(run_id)s, %(page)s, "
        "j.position, j.record, j.reasons, %(stored_at)s "
        "FROM jsonb_to_recordset(%(rejects)s::jsonb) AS j(position int, record jsonb, "
        "reasons jsonb)), "
    ) if rejects else ""
    return (  # constant text and schema identifiers only; every value is bound
        f"WITH up AS ({statement(scope, 'postgresql')}), {rejected}"  # noqa: S608
        "n AS (SELECT count(*) AS applied FROM up), "
        "cnt AS (UPDATE runs SET pages = pages + 1, accepted = accepted + n.applied, "
        "rejected = rejected + %(rejected)s, stale = stale + %(offered)s - n.applied, "
        "normalised = normalised + %(normalised)s FROM n WHERE runs.id = %(run_id)s), "
        "cp AS (INSERT INTO checkpoints (tenant_id, scope, next_number, next_page, next_cursor, "
        "run_id, updated_at) VALUES (%(tenant_id)s, %(scope)s, %(next_number)s, %(next_page)s, "
        f"%(next_cursor)s, %(run_id)s, %(stored_at)s) {_CHECKPOINT_UPSERT}) "
        "SELECT applied FROM n"
    )


def pg_page_params(document: str, rejections: Sequence[Rejection],
                   checkpoint: Checkpoint, scope: Scope, *, tenant: str, run_id: int,
                   page: str, offered: int, normalised: int, now: datetime) -> dict[str, Any]:
    """The parameters of pg_page_statement; `document` from pg_document."""
    params: dict[str, Any] = dict(
        doc=document, tenant_id=tenant, run_id=run_id, stored_at=_iso_time(now),
        scope=scope.value, page=page, offered=offered, rejected=len(rejections),
        normalised=normalised, next_number=checkpoint.next_number,
        next_page=checkpoint.next_page, next_cursor=checkpoint.next_cursor,
    )
    if rejections:
        params["rejects"] = json_text([
            {"position": r.position, "record": r.raw, "reasons": list(r.reasons)}
            for r in rejections])
    return params


def _pg_source(table: Table, scope: Scope) -> str:
    keys = PG_KEYS[scope]  # the document's key of each column
    picks, fields = [], []
    for column in table.columns:
        if column.name in _FROM_PAGE:
            picks.append(f"%({column.name})s")
            continue
        picks.append(f'r."{keys[column.name]}"')
        fields.append(f'"{keys[column.name]}" {_pg_type(column.type)}')
    return (f"SELECT {', '.join(picks)} FROM jsonb_to_recordset(%(doc)s::jsonb) "  # noqa: S608
            f"AS r({', '.join(fields)})")


def _pg_type(kind: object) -> str:
    if isinstance(kind, JSON):
        return "jsonb"
    if isinstance(kind, schema.UtcDateTime):
        return "timestamptz"
    return "text"


def _iso_time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def check_layouts() -> None:
    """forms.LAYOUTS against schema.py's record tables; raises AssertionError on a schema
    edit that forms.py does not follow (run at import: a wrong layout would store columns
    in each other's places)."""
    for scope, (_, documents) in LAYOUTS.items():
        table = schema.RECORD_TABLES[scope.value]
        names = [c.name for c in table.columns]
        expected = ["tenant_id", *record_columns(scope), "run_id", "stored_at"]
        json_columns = {c.name for c in table.columns if isinstance(c.type, JSON)}
        if names != expected or json_columns != set(documents):
            raise AssertionError(f"{scope.value} columns are {names} (JSON: {json_columns}); "
                                 f"forms.LAYOUTS says {expected} (JSON: {documents})")


check_layouts()
