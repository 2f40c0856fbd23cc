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

from functools import cache

from sqlalchemy import JSON

from puller import pg_store, schema, sqlite_store
from puller.domain import Scope
from puller.forms import LAYOUTS, record_columns


@cache
def statement(scope: Scope, dialect: str, rows: int = 1) -> str:
    """The page upsert: ON CONFLICT DO UPDATE … WHERE newer (merge.is_newer in SQL), full
    replacement. PostgreSQL: INSERT … SELECT FROM the page document RETURNING the id
    (pg_store.record_statement). SQLite: sqlite_store.statement, for `rows` rows."""
    if dialect == "sqlite":
        return sqlite_store.statement(scope, rows)
    return pg_store.record_statement(scope)


pg_page_statement = pg_store.page_statement
pg_page_params = pg_store.page_params


def check_layouts() -> None:
    """forms.LAYOUTS against schema.py's record tables; raises AssertionError on a schema
    edit that forms.py does not follow (run at import: a wrong layout would store columns
    in each other's places)."""
    for scope, (_, documents) in LAYOUTS.items():
        table = schema.RECORD_TABLES[scope.value]
        names = [c.name for c in table.columns]
        expected = ["tenant_id", *record_columns(scope), "run_id", "stored_at"]
        json_columns = {c.name for c in table.columns if isinstance(c.type, JSON)}
        times = {c.name for c in table.columns if isinstance(c.type, schema.UtcDateTime)}
        if times != {*pg_store.TIMES, "stored_at"}:
            raise AssertionError(f"{scope.value}'s time columns are {times}; "
                                 f"pg_store.TIMES says {pg_store.TIMES}")
        if sqlite_store.TABLES[scope] != table.name:
            raise AssertionError(f"{scope.value}'s table is {table.name}; "
                                 f"sqlite_store.TABLES says {sqlite_store.TABLES[scope]}")
        if names != expected or json_columns != set(documents):
            raise AssertionError(f"{scope.value} columns are {names} (JSON: {json_columns}); "
                                 f"forms.LAYOUTS says {expected} (JSON: {documents})")


check_layouts()
