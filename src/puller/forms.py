"""A page's records in the form each store's page write takes (issue #5): SQLite's rows of
plain values, PostgreSQL's one JSON document. Plain Python, no SQLAlchemy: the fetch
process (fetcher) builds these forms, and it is forked before the main process imports
SQLAlchemy (~0.3 s of imports it would otherwise repeat or wait for). sqlite_store.py and
pg_store.py hold the statements that take them; upsert.py checks at import that LAYOUTS
matches schema.py's tables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from operator import itemgetter
from string import ascii_lowercase
from typing import Any

import orjson

from puller import fast_rules, merge
from puller import records as rules
from puller.domain import Accepted, Scope, StoreRows
from puller.protocol import json_text

SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"
"""SQLAlchemy's SQLite DATETIME text form: reads through schema.UtcDateTime still work,
and text order is time order because every value is UTC."""


LAYOUTS: dict[Scope, tuple[tuple[str, ...], tuple[str, ...]]] = {
    Scope.CUSTOMER: (fast_rules.CUSTOMER_COLUMNS, ("extra",)),
    Scope.ORDER: (("customer_id",), ("payload",)),
    Scope.PRODUCT: ((), ("payload",)),
}
"""Each record table's value columns, plain then JSON, as schema.py orders them: tenant, id,
these, then last_modified_date, deleted_at, run_id, stored_at (upsert checks it)."""


def record_columns(scope: Scope) -> tuple[str, ...]:
    """The columns a record fills, in schema.py's order: the table's columns without
    tenant_id, run_id and stored_at, which a page's statement adds. SQLite's flat rows hold
    these values (sqlite_rows); PostgreSQL's document has these keys (PG_KEYS)."""
    plain, documents = LAYOUTS[scope]
    return (scope.id_field, *plain, *documents, "last_modified_date", "deleted_at")


def _pg_keys(scope: Scope) -> dict[str, str]:
    names = record_columns(scope)
    return dict(zip(names, ascii_lowercase[:len(names)], strict=True))


PG_KEYS = {scope: _pg_keys(scope) for scope in Scope}
"""Each record table's columns as the keys of PostgreSQL's page document (pg_document),
one letter each: PostgreSQL reads every key of every record, and with the column names a
customer took ~270 bytes of the document, ~200 so (a page of 500: 134,605 -> 98,605
bytes); its page statements alone took 7% less time (100 statements of 500 customers, 7
interleaved rounds, less in each)."""


def sqlite_width(scope: Scope) -> int:
    """How many values a record has in SQLite's flat rows (sqlite_rows)."""
    return len(record_columns(scope))


def prepare(records: Sequence[Accepted], scope: Scope, dialect: str) -> StoreRows:
    """A page's accepted records, newest per id, in the form `dialect`'s page write takes."""
    survivors, duplicates = merge.newest_per_id(records)
    payload: Any = (sqlite_rows(survivors, scope) if dialect == "sqlite"
                    else pg_document(survivors, scope))
    return StoreRows(dialect=dialect, payload=payload, survivors=len(survivors),
                     duplicates=duplicates)


def page_rows(accepted: Sequence[Accepted], rows: StoreRows | None, scope: Scope,
              dialect: str) -> StoreRows:
    """A page's records as a store of `dialect` writes them: `rows` when the fetch process
    made them so already, else `accepted` prepared."""
    if rows is None:
        return prepare(accepted, scope, dialect)
    if rows.dialect != dialect:  # pragma: no cover - a defect, not input
        raise AssertionError(f"rows for {rows.dialect} given to a {dialect} store")
    return rows


def stored_error(error: str | None) -> str | None:
    """A run's error as stored: a NUL character (a tenant's own message can hold one) as
    U+FFFD, since PostgreSQL's text cannot hold it and the run would stay open."""
    return None if error is None else error.replace("\x00", "\ufffd")


def customer_rows(valid: rules.ValidCustomers, dialect: str) -> StoreRows | None:
    """A customer page in `dialect`'s form straight from pydantic-core's valid dicts
    (records.valid_customers): the same rows or document as `prepare` makes of the page's
    records (a property test checks it), without building those records first. For a page
    of 500 customers on SQLite: records then rows 1.7 ms, these rows 0.6 ms. None when the
    page needs more: an id sent twice (prepare keeps the newest), or a timestamp of the
    right shape that is no date."""
    ids = [fast_rules.customer_id_text(key) for key in map(_CUSTOMER_ID, valid.records)]
    return _straight_rows(ids, dialect, lambda: (
        _sqlite_customers(valid, ids) if dialect == "sqlite" else _pg_customers(valid, ids)))


def _straight_rows(ids: list[str], dialect: str, build: Callable[[], Any]) -> StoreRows | None:
    """A page's form built by `build` from the fast path's dicts (customer_rows,
    payload_rows); None when the page needs the long way: an id sent twice (prepare keeps
    the newest), or a timestamp of the right shape that is no date (`build` raises
    ValueError)."""
    if len(set(ids)) != len(ids):
        return None
    try:
        payload = build()
    except ValueError:
        return None
    return StoreRows(dialect=dialect, payload=payload, survivors=len(ids), duplicates=0)


_CUSTOMER_ID = itemgetter("customer_id")
# LAYOUTS[Scope.CUSTOMER]: these, then extra
_CUSTOMER_PLAIN = itemgetter(*fast_rules.CUSTOMER_COLUMNS)


def _sqlite_customers(valid: rules.ValidCustomers, ids: list[str]) -> list[str]:
    # The fetch process's busiest part at page size 500 (py-spy: a third of it). The
    # plain columns are taken by one itemgetter call, the extra fields written as text
    # (extra_texts), and a whole-second Z time copied (_sqlite_time_of). Copying the time
    # in this loop instead of calling _sqlite_time_of gained nothing measurable (page of
    # 500, 15 interleaved rounds: 1.293 against 1.271 ms best with one extra field).
    plain, extra, time_of = _CUSTOMER_PLAIN, extra_texts(), _sqlite_time_of
    values: list[str] = []
    add = values.extend
    for record_id, record, sent in zip(ids, valid.records, valid.sent, strict=True):
        deleted = record.get("deleted_at")
        add((record_id, *plain(record), extra(record, sent),
             time_of(record["last_modified_date"]),
             NO_TIME if deleted is None else time_of(deleted)))
    return values


def _sqlite_time_of(text: str) -> str:
    """The SQLite text of a fast-path timestamp; raises ValueError for one of the right
    shape that is no date (2024-13-01), as fast_rules.utc does. Whole seconds in UTC
    ("2024-12-01T10:30:00Z", what tenants mostly send: fast_rules._FAST_TIME's shape at 20
    characters) are copied from the text once parsing has checked the date (an offset of
    zero cannot leave the years 1 to 9999): a third of the cost of formatting the time."""
    if len(text) == 20 and text[19] == "Z":
        datetime.fromisoformat(text)
        return f"{text[:10]} {text[11:19]}.000000"
    return sqlite_time(fast_rules.utc(text))


ExtraText = Callable[[dict[str, Any], dict[str, Any]], str]
"""customer_extra_text(record, sent) for the records of one page (extra_texts)."""


def extra_texts() -> ExtraText:
    """customer_extra_text for one page's records: what fast_rules.extra_fields gives, as
    its stored JSON text (json_text's), for SQLite's rows. One field beyond the declared
    ones, as tenants mostly send, is written without its dict, around orjson's text of its
    value (the same text): SQLite's rows of a page of 500 customers with one such field
    took 1.26 ms with the dict, 0.92 ms so (best of 15 interleaved rounds). A record whose
    one extra field is the one of the record before is known so by two lookups, without
    its keys' layout (a tuple of them, hashed): 7.4k -> 5.3k instructions a record
    (callgrind)."""
    layouts: dict[tuple[str, ...], tuple[str, str | None]] = {}
    as_dict = fast_rules.extra_fields()
    # The one extra field of the last record that had one, and its text's head; a head of
    # None sends a record the general way (json_text of the dict).
    lone_name, lone_head = "", None

    def lone_field(sent: dict[str, Any]) -> tuple[str, str | None]:
        """The name and text head of `sent`'s one extra field; a head of None if several."""
        nonlocal lone_name, lone_head
        keys = tuple(sent)
        layout = layouts.get(keys)
        if layout is None:
            names = [key for key in keys if key not in fast_rules.CUSTOMER_FIELDS]
            layout = layouts[keys] = (
                (names[0], "{" + json_text(names[0]) + ":") if len(names) == 1 else ("", None))
        if layout[1] is not None:
            lone_name, lone_head = layout
        return layout

    def customer_extra_text(record: dict[str, Any], sent: dict[str, Any]) -> str:
        # `record` holds the declared fields of `sent` and no other (fast_rules.extra_fields),
        # so `sent` has `extras` fields beyond them; when that is one and the last lone
        # field (never a declared name) is among them, it is that one.
        extras = len(sent) - len(record)
        if extras == 0:
            return "{}"  # every field is a declared one
        name, head = lone_name, lone_head
        if extras != 1 or name not in sent:
            name, head = lone_field(sent)
        if head is not None:
            value = sent[name]
            if type(value) is not dict and type(value) is not list:  # checked for depth
                # try, not contextlib.suppress: its object cost 0.6 us a record here (a
                # third of the function), a try nothing while nothing is raised.
                try:
                    return head + orjson.dumps(value).decode() + "}"
                except orjson.JSONEncodeError:  # beyond 64 bits: json_text's way
                    pass
        return json_text(as_dict(record, sent))

    return customer_extra_text


def payload_rows(scope: Scope, valid: rules.ValidPayloads, dialect: str) -> StoreRows | None:
    """An order or product page in `dialect`'s form straight from pydantic-core's valid
    dicts (records.valid_payloads), as customer_rows does for customers: the same rows or
    document as `prepare` makes of the page's records (a property test checks it). None
    when the page needs more: an id sent twice, or a timestamp of the right shape that is
    no date."""
    key = scope.id_field
    ids = [str(record[key]) for record in valid.records]
    return _straight_rows(ids, dialect, lambda: (
        _sqlite_payloads(scope, valid, ids) if dialect == "sqlite"
        else _pg_payloads(scope, valid, ids)))


def _sqlite_payloads(scope: Scope, valid: rules.ValidPayloads, ids: list[str]) -> list[str]:
    order, time_of = scope is Scope.ORDER, _sqlite_time_of
    values: list[str] = []
    add = values.extend
    for record_id, record, sent in zip(ids, valid.records, valid.sent, strict=True):
        deleted = record.get("deleted_at")
        add((record_id, *((str(record["customer_id"]),) if order else ()), json_text(sent),
             time_of(record["last_modified_date"]),
             NO_TIME if deleted is None else time_of(deleted)))
    return values


def _pg_payloads(scope: Scope, valid: rules.ValidPayloads, ids: list[str]) -> str:
    utc, keys = fast_rules.utc, PG_KEYS[scope]
    id_key, time_key, deleted_key, payload_key = (
        keys[scope.id_field], keys["last_modified_date"], keys["deleted_at"], keys["payload"])
    customer_key = keys.get("customer_id")  # orders only
    documents = []
    for record_id, record, sent in zip(ids, valid.records, valid.sent, strict=True):
        deleted = record.get("deleted_at")
        document = {id_key: record_id, time_key: utc(record["last_modified_date"]),
                    deleted_key: None if deleted is None else utc(deleted)}
        if customer_key is not None:
            document[customer_key] = str(record["customer_id"])
        document[payload_key] = sent
        documents.append(document)
    return json_text(documents)


NO_TIME = ""
"""deleted_at of a record that is not deleted, in SQLite's rows: text, as every other value
(StoreRows crosses the pipe as one text); the statement stores it as NULL."""


def _pg_customers(valid: rules.ValidCustomers, ids: list[str]) -> str:
    utc, extra = fast_rules.utc, fast_rules.extra_fields()
    keys = PG_KEYS[Scope.CUSTOMER]
    id_key, time_key, deleted_key, extra_key = (
        keys["customer_id"], keys["last_modified_date"], keys["deleted_at"], keys["extra"])
    plain = [(keys[name], name) for name in fast_rules.CUSTOMER_COLUMNS]
    documents = []
    for record_id, record, sent in zip(ids, valid.records, valid.sent, strict=True):
        deleted = record.get("deleted_at")
        document = {id_key: record_id, time_key: utc(record["last_modified_date"]),
                    deleted_key: None if deleted is None else utc(deleted)}
        for key, name in plain:
            document[key] = record[name]
        document[extra_key] = extra(record, sent)
        documents.append(document)
    return json_text(documents)


def pg_document(records: Sequence[Accepted], scope: Scope) -> str:
    """The records as the one JSON document of pg_store.page_statement, each an object keyed by
    PG_KEYS. orjson writes the aware datetimes as RFC 3339 text itself (2.5 ms a page of
    500 customers with isoformat() in Python, 1.0 ms so); every Accepted time is UTC
    (fast_rules.utc, records._timestamp)."""
    keys = PG_KEYS[scope]
    id_key, time_key, deleted_key = (
        keys[scope.id_field], keys["last_modified_date"], keys["deleted_at"])
    return json_text([
        {id_key: r.record_id, time_key: r.last_modified_at, deleted_key: r.deleted_at,
         **{keys[name]: value for name, value in r.columns.items()}}
        for r in records
    ])


def sqlite_rows(records: Sequence[Accepted], scope: Scope) -> list[str]:
    """The records' values for SQLite's page statement (sqlite_store.upsert), row after
    row in one list: the table's columns in order without tenant_id, run_id and stored_at,
    which the statement takes once a page; JSON columns as text, times as SQLITE_TIME
    text, NO_TIME for no deleted_at."""
    plain, documents = LAYOUTS[scope]
    values: list[str] = []
    for r in records:
        columns = r.columns
        deleted = r.deleted_at
        values += (r.record_id, *[columns[name] for name in plain],
                   *[json_text(columns[name]) for name in documents],
                   sqlite_time(r.last_modified_at),
                   NO_TIME if deleted is None else sqlite_time(deleted))
    return values


def sqlite_time(value: datetime) -> str:
    # Same text as strftime(SQLITE_TIME) at a third of its cost (0.56 µs against 1.7).
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return _SQLITE_TIME_TEXT % (value.year, value.month, value.day, value.hour, value.minute,
                                value.second, value.microsecond)


_SQLITE_TIME_TEXT = "%04d-%02d-%02d %02d:%02d:%02d.%06d"
