"""A page's writes, newest wins in SQL, built for each dialect's fastest path (issue #5).

SQLAlchemy's per-row parameter processing cost ~20 µs a record, and its statement
machinery ~60 µs per bookkeeping statement. PostgreSQL gets the whole page (records,
rejections, run counters, checkpoint) as one statement of data-modifying CTEs with the
records as one JSON parameter (`jsonb_to_recordset`): one round trip, one transaction.
SQLite gets the rows' values as multi-row VALUES, a few statements a page, with the
tenant, the run and the time bound once a statement (sqlite_store.upsert; `executemany`,
one execution a row, cost SQLite 20% more CPU; `json_each` re-parsed each row per column
and was slower still) and three more statements on the driver connection, inside one
BEGIN … COMMIT (sqlite_store.py, which imports no SQLAlchemy). The records' rows and
document are built in forms.py, which imports no SQLAlchemy either (the fetch process
builds them).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cache
from typing import Any

from sqlalchemy import JSON, Table

from puller import schema, sqlite_store
from puller.domain import Checkpoint, Rejection, Scope
from puller.forms import LAYOUTS, PG_KEYS, record_columns
from puller.protocol import json_text

_FROM_PAGE = ("tenant_id", "run_id", "stored_at")  # bound once per page, not per row


@cache
def statement(scope: Scope, dialect: str, rows: int = 1) -> str:
    """The page upsert: ON CONFLICT DO UPDATE … WHERE newer (merge.is_newer in SQL), full
    replacement. PostgreSQL: INSERT … SELECT FROM the page document RETURNING the id.
    SQLite: sqlite_store.statement, for `rows` rows."""
    if dialect == "sqlite":
        return sqlite_store.statement(scope, rows)
    table = schema.RECORD_TABLES[scope.value]
    key = scope.id_field
    names = [c.name for c in table.columns]
    quoted = ", ".join(f'"{n}"' for n in names)
    # Identifiers come from schema.py, never from input; every value is a bound parameter.
    return (f'INSERT INTO "{table.name}" ({quoted}) {_pg_source(table, scope)} '
            f"{sqlite_store.upsert_clause(table.name, names, key)} RETURNING \"{key}\"")


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
        f"%(next_cursor)s, %(run_id)s, %(stored_at)s) {sqlite_store.CHECKPOINT_UPSERT}) "
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
        if sqlite_store.TABLES[scope] != table.name:
            raise AssertionError(f"{scope.value}'s table is {table.name}; "
                                 f"sqlite_store.TABLES says {sqlite_store.TABLES[scope]}")
        if names != expected or json_columns != set(documents):
            raise AssertionError(f"{scope.value} columns are {names} (JSON: {json_columns}); "
                                 f"forms.LAYOUTS says {expected} (JSON: {documents})")


check_layouts()
