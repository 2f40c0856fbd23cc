"""The page writes' layouts checked against schema.py at import (issue #5).

A page's writes, newest wins in SQL, are built for each database's fastest path without
SQLAlchemy: sqlite_store.py (multi-row VALUES, the tenant, the run and the time bound once
a statement, and three more statements inside one BEGIN … COMMIT) and pg_store.py (the
whole page as one statement of data-modifying CTEs, the records as one JSON parameter).
They take their columns from forms.LAYOUTS, and their tables and time columns from
sqlite_store.TABLES and pg_store.TIMES; store.py imports this module, so a schema.py edit
those do not follow fails at import rather than storing columns in each other's places.
"""

from __future__ import annotations

from sqlalchemy import JSON

from puller import pg_store, schema, sqlite_store
from puller.forms import LAYOUTS, record_columns


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
