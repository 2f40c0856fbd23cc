"""The record rules as pydantic-core constraints (issue #5), for records' fast path.

records' rules call Python per field (~4.6 µs a customer). The same rules written as
pydantic-core constraints run in Rust, a whole page in one call (~1.1 µs a customer).
They accept a subset of what records' rules accept, never more, and yield the same values:
a page they refuse goes to records' explaining path, which decides and explains.
tests/unit/test_properties.py checks the subset and the sameness on generated records.
Also here: what both paths share (the id length, the language tag, the customer's
columns), and the helpers that put a fast-path record in the store's form (forms.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, NotRequired

from pydantic import Field, Strict, StringConstraints, TypeAdapter
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from puller.domain import Accepted, Scope
from puller.shapes import TooDeep, money_ok, nests_too_deep

LANGUAGE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
MAX_ID_CHARS = 100
CUSTOMER_COLUMNS = (
    "email", "first_name", "last_name", "mobile", "language", "consent", "gender",
)

# Python's \s (str.isspace) is Rust's \s plus U+001C..U+001F (checked over every code point).
_SPACE = r"\s\x1c-\x1f"
_FAST_NOT_BLANK = f"[^{_SPACE}]"
_FAST_EMAIL = (
    f"^[^{_SPACE}@\\\"(),:;<>\\[\\]\\\\]+@[^{_SPACE}@.\\\"(),:;<>\\[\\]\\\\]+"
    f"(\\.[^{_SPACE}@.\\\"(),:;<>\\[\\]\\\\]+)+$"
)
# A common ISO 8601 shape with a UTC offset; datetime.fromisoformat still parses it (a
# 13th month fails there and sends the page to the explaining path).
_FAST_TIME = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?"
    r"(Z|[+-][0-9]{2}:[0-9]{2})$"
)
_I64 = 2**63


_FastName = Annotated[str, Strict(), StringConstraints(max_length=100, pattern=_FAST_NOT_BLANK)]
_FastId = (
    Annotated[str, Strict(), StringConstraints(max_length=MAX_ID_CHARS, pattern=_FAST_NOT_BLANK)]
    | Annotated[int, Strict(), Field(gt=-_I64, lt=_I64)]
)
_FastTime = Annotated[str, Strict(), StringConstraints(max_length=40, pattern=_FAST_TIME)]


# Fields beyond the declared ones are left out (a TypedDict's default, extra="ignore"):
# with extra="allow", pydantic-core tracks the keys it used, and validated a page of 500
# customers in 0.77-0.80 ms instead of 0.50; extra_fields takes them from the record sent.
class _FastRecord(TypedDict):
    last_modified_date: _FastTime
    deleted_at: NotRequired[_FastTime | None]


class _FastCustomer(_FastRecord):
    customer_id: _FastId
    email: Annotated[str, Strict(), StringConstraints(max_length=255, pattern=_FAST_EMAIL)]
    first_name: _FastName
    last_name: Annotated[str, Strict(),
                         StringConstraints(max_length=300, pattern=_FAST_NOT_BLANK)]
    mobile: Annotated[str, Strict(), StringConstraints(max_length=20, pattern=_FAST_NOT_BLANK)]
    language: Annotated[str, Strict(),
                        StringConstraints(max_length=10, pattern=LANGUAGE.pattern)]
    consent: Literal["Yes", "No"]
    gender: Literal["Male", "Female"]


class _FastOrder(_FastRecord):
    order_id: _FastId
    customer_id: _FastId


class _FastProduct(_FastRecord):
    product_id: _FastId


_FAST_TYPES: dict[Scope, type] = {
    Scope.CUSTOMER: _FastCustomer, Scope.ORDER: _FastOrder, Scope.PRODUCT: _FastProduct
}
_fast_adapters: dict[Scope, TypeAdapter[list[dict[str, Any]]]] = {}


def adapter(scope: Scope) -> TypeAdapter[list[dict[str, Any]]]:
    adapter = _fast_adapters.get(scope)
    if adapter is None:
        adapter = _fast_adapters[scope] = TypeAdapter(
            list[_FAST_TYPES[scope]])  # type: ignore[valid-type]
    return adapter


def accepted_page(scope: Scope, valid: list[dict[str, Any]],
                   candidates: Sequence[dict[str, Any]]) -> list[Accepted] | None:
    """Every record of a page the fast path validated (_fast_valid) accepted, as the
    explaining path would accept it; None if any is not."""
    try:
        if scope is Scope.CUSTOMER:
            return _fast_customers(valid, candidates)
        return _fast_payloads(scope, valid, candidates)
    except ValueError:  # a timestamp of the right shape that is no date (2024-13-01)
        return None


def _fast_customers(valid: list[dict[str, Any]],
                    candidates: Sequence[dict[str, Any]]) -> list[Accepted]:
    accepted = []
    customer_extra = extra_fields()
    for position, (record, sent) in enumerate(zip(valid, candidates, strict=True)):
        deleted = record.get("deleted_at")
        columns = {name: record[name] for name in CUSTOMER_COLUMNS}
        columns["extra"] = customer_extra(record, sent)
        accepted.append(Accepted(
            customer_id_text(record["customer_id"]), utc(record["last_modified_date"]),
            None if deleted is None else utc(deleted), columns, position))
    return accepted


def customer_id_text(value: str | int) -> str:
    """A fast-path id as stored: ids are text; an integer id is its decimal string."""
    return value if type(value) is str else str(value)


ExtraFields = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]
"""customer_extra(record, sent) for the records of one page (extra_fields)."""


def extra_fields() -> ExtraFields:
    """customer_extra for one page's records: a valid customer's fields beyond the declared
    ones, in the order sent, stored as `extra`. `record` is pydantic-core's
    (valid_customers, _fast_valid), which holds the declared fields of `sent` and no other:
    when it has as many, `sent` has no other. The names of the extra fields are found once
    for each order of keys the page's records come in (mostly one): a page of 500
    customers with one extra field each took 0.40 ms picking them record by record, 0.28
    ms so."""
    declared = _DECLARED
    layouts: dict[tuple[str, ...], tuple[str, ...]] = {}

    def customer_extra(record: dict[str, Any], sent: dict[str, Any]) -> dict[str, Any]:
        if len(sent) == len(record):
            return {}  # every field is a declared one
        keys = tuple(sent)
        names = layouts.get(keys)
        if names is None:
            names = layouts[keys] = tuple(key for key in keys if key not in declared)
        extra = {name: sent[name] for name in names}
        for value in extra.values():  # ~0.1 µs a record; parsed JSON has plain dicts and lists
            if type(value) in _CONTAINERS:
                if nests_too_deep(extra):
                    raise TooDeep("extra")  # the page takes the explaining path: rejected there
                break
        return extra

    return customer_extra


_CONTAINERS = frozenset({dict, list})


def _fast_payloads(scope: Scope, valid: list[dict[str, Any]],
                   candidates: Sequence[object]) -> list[Accepted] | None:
    accepted = []
    key = scope.id_field
    for position, (record, raw) in enumerate(zip(valid, candidates, strict=True)):
        assert isinstance(raw, dict)
        if not money_ok(raw):
            return None
        columns: dict[str, Any] = {"payload": raw}
        if scope is Scope.ORDER:
            columns = {"customer_id": str(record["customer_id"]), "payload": raw}
        deleted = record.get("deleted_at")
        accepted.append(Accepted(
            str(record[key]), utc(record["last_modified_date"]),
            None if deleted is None else utc(deleted), columns, position))
    return accepted


_DECLARED = _FastCustomer.__required_keys__ | _FastCustomer.__optional_keys__
CUSTOMER_FIELDS: frozenset[str] = frozenset(_DECLARED)
"""The fields a customer declares; any other it has is kept as `extra` (extra_fields)."""


def utc(value: str) -> datetime:
    """A fast-path timestamp as stored: aware, in UTC. Raises ValueError for one of the
    right shape that is no date (2024-13-01), or that is outside the years 1 to 9999 in
    UTC: the page then takes the explaining path."""
    try:
        return datetime.fromisoformat(value).astimezone(UTC)
    except OverflowError:
        raise ValueError(value) from None
