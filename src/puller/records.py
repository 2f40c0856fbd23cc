"""Per-scope record rules (SPEC §2): accept what is valid, explain every reason for the rest."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StringConstraints,
    ValidationError,
)

from puller import fast_rules
from puller.domain import Accepted, Raw, RecordsWithNul, Rejection, Scope, ValidatedPage
from puller.fast_rules import CUSTOMER_COLUMNS, LANGUAGE, MAX_ID_CHARS
from puller.shapes import (
    TOO_DEEP,
    money_ok,
    money_problems,
    nests_too_deep,
    nul_at,
    too_deep_copy,
    without_nul,
)

# The public guide's example sends "YES"; strict mode rejects it, normalize_case accepts it.
CASE_CANONICAL = {
    "consent": {"yes": "Yes", "no": "No"},
    "gender": {"male": "Male", "female": "Female"},
}
_EMAIL = re.compile(
    r"^[^\s@\"(),:;<>\[\]\\]+@[^\s@.\"(),:;<>\[\]\\]+(\.[^\s@.\"(),:;<>\[\]\\]+)+$"
)


def _timestamp(value: object) -> datetime:
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 timestamp string such as 2024-12-01T10:30:00Z")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{value[:40]!r} is not an ISO 8601 timestamp; send e.g. 2024-12-01T10:30:00Z"
        ) from None
    if parsed.tzinfo is None:
        # Decided (README "Record rules"): without an offset the instant is ambiguous and
        # newest-wins could order versions wrongly, so the record is rejected, not guessed.
        raise ValueError(f"{value[:40]!r} has no UTC offset; send e.g. 2024-12-01T10:30:00Z")
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+05:30 is before the year 1 in UTC
        raise ValueError(
            f"{value[:40]!r} is outside the years 1 to 9999 once in UTC; send the real time, "
            "e.g. 2024-12-01T10:30:00Z"
        ) from None


def _record_id(value: object) -> object:
    # Ids are text; an integer id (common in exports) is accepted as its decimal string.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or blank")
    return value


def _id(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or blank")
    if len(value) > MAX_ID_CHARS:
        raise ValueError(f"is {len(value)} characters; at most {MAX_ID_CHARS} are allowed")
    return value


def _email(value: str) -> str:
    if not _EMAIL.fullmatch(value):
        raise ValueError(f"{value[:60]!r} is not a valid email address")
    return value


def _language(value: str) -> str:
    if not LANGUAGE.fullmatch(value):
        raise ValueError(f"{value!r} is not a language tag such as en or en-US")
    return value


Timestamp = Annotated[datetime, BeforeValidator(_timestamp)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=100), AfterValidator(_not_blank)]
LastName = Annotated[
    str, StringConstraints(min_length=1, max_length=300), AfterValidator(_not_blank)
]
Mobile = Annotated[str, StringConstraints(min_length=1, max_length=20), AfterValidator(_not_blank)]
RecordId = Annotated[str, BeforeValidator(_record_id), AfterValidator(_id)]


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, strict=False)

    last_modified_date: Timestamp
    deleted_at: Timestamp | None = None


class Customer(_Record):
    """A customer profile; every field required and non-empty."""

    customer_id: RecordId
    email: Annotated[str, StringConstraints(min_length=1, max_length=255), AfterValidator(_email)]
    first_name: Name
    last_name: LastName
    mobile: Mobile
    language: Annotated[str, StringConstraints(min_length=1, max_length=10),
                        AfterValidator(_language)]
    consent: Literal["Yes", "No"]
    gender: Literal["Male", "Female"]


class Order(_Record):
    """An order; everything beyond the keys is kept as payload."""

    order_id: RecordId
    customer_id: RecordId


class Product(_Record):
    """A product; everything beyond the key is kept as payload."""

    product_id: RecordId


MODELS: dict[Scope, type[_Record]] = {
    Scope.CUSTOMER: Customer, Scope.ORDER: Order, Scope.PRODUCT: Product
}


def validate_page(
    scope: Scope, raws: Sequence[object], *, normalize_case: bool = False
) -> ValidatedPage:
    """Validate every record of a page; invalid ones become rejections with all reasons.

    A page whose every record is valid takes the fast path (one pydantic-core call for the
    page, see _fast_valid and fast_rules.accepted_page); any other page is validated record by
    record, which explains, and so is a page whose body had a NUL character
    (RecordsWithNul).
    """
    fast = _fast_valid(scope, raws, normalize_case=normalize_case)
    if fast is not None:
        valid, candidates, changes = fast
        accepted = fast_rules.accepted_page(scope, valid, candidates)
        if accepted is not None:
            return ValidatedPage(accepted=accepted, rejections=[], normalised=changes)
    return _slow_page(scope, raws, normalize_case=normalize_case)


_FastValid = tuple[list[dict[str, Any]], Sequence[dict[str, Any]], int]


def _fast_valid(scope: Scope, raws: Sequence[object], *, normalize_case: bool
                ) -> _FastValid | None:
    """pydantic-core's dicts of a page that the fast path accepts whole (the declared
    fields only), the records as validated (case normalised) and how many fields
    normalisation changed; None when any record fails it, or the body had a NUL
    character (RecordsWithNul): validate_page's explaining path takes such a page."""
    if isinstance(raws, RecordsWithNul):
        return None
    candidates, changes = _candidates(raws, normalize_case=normalize_case)
    try:
        valid = fast_rules.adapter(scope).validate_python(candidates)
    except ValidationError:
        return None
    return valid, candidates, changes  # type: ignore[return-value]


class ValidCustomers(NamedTuple):
    """A customer page that the fast path accepts whole (valid_customers)."""

    records: list[dict[str, Any]]
    """pydantic-core's dicts: the declared fields only."""
    sent: Sequence[dict[str, Any]]
    """The records as validated (case normalised), for their extra fields
    (fast_rules.extra_fields)."""
    normalised: int
    """How many fields case normalisation changed."""


def valid_customers(raws: Sequence[object], *, normalize_case: bool = False
                    ) -> ValidCustomers | None:
    """A customer page as pydantic-core validated it when the fast path accepts every
    record; None when it does not (then validate_page decides and explains). For a page's
    store form built straight from these dicts (forms.customer_rows), with
    fast_rules' `customer_id_text`, `utc` and `extra_fields`: what validate_page's records hold,
    without building them."""
    fast = _fast_valid(Scope.CUSTOMER, raws, normalize_case=normalize_case)
    return None if fast is None else ValidCustomers(*fast)


class ValidPayloads(NamedTuple):
    """An order or product page that the fast path accepts whole (valid_payloads)."""

    records: list[dict[str, Any]]
    """pydantic-core's dicts: the declared fields only (the keys and the times)."""
    sent: Sequence[dict[str, Any]]
    """The records as validated (case normalised): what is stored as each one's payload."""
    normalised: int
    """How many fields case normalisation changed."""


def valid_payloads(scope: Scope, raws: Sequence[object], *, normalize_case: bool = False
                   ) -> ValidPayloads | None:
    """An order or product page as pydantic-core validated it when the fast path accepts
    every record, its money included (money_ok); None when it does not (then
    validate_page decides and explains). For a page's store form built straight from
    these dicts (forms.payload_rows): what validate_page's records hold, without building
    them."""
    fast = _fast_valid(scope, raws, normalize_case=normalize_case)
    if fast is None:
        return None
    for raw in fast[1]:
        if not money_ok(raw):
            return None
    return ValidPayloads(*fast)


def _candidates(raws: Sequence[object], *, normalize_case: bool
                ) -> tuple[Sequence[object], int]:
    if not normalize_case:
        return raws, 0
    pairs = [normalised_case(raw) if isinstance(raw, dict) else (raw, 0) for raw in raws]
    return [pair[0] for pair in pairs], sum(pair[1] for pair in pairs)


def _slow_page(scope: Scope, raws: Sequence[object], *, normalize_case: bool) -> ValidatedPage:
    model = MODELS[scope]
    columns = _COLUMNS[scope]
    accepted: list[Accepted] = []
    rejections: list[Rejection] = []
    normalised = 0
    for position, raw in enumerate(raws):
        if not isinstance(raw, dict) or nests_too_deep(raw):
            kept: object = too_deep_copy(raw)
            if isinstance(raws, RecordsWithNul):
                kept = without_nul(kept)
            reason = TOO_DEEP if isinstance(raw, dict) else f"record is {_kind(raw)}, not an object"
            rejections.append(Rejection(position, kept, (reason,)))
            continue
        if isinstance(raws, RecordsWithNul) and (where := nul_at(raw)) is not None:
            rejections.append(Rejection(position, without_nul(raw), (
                f"{where}: holds a NUL character (\\u0000), which PostgreSQL cannot store "
                "(the copy kept here shows it as U+FFFD) — report it to the tenant",)))
            continue
        candidate = raw
        if normalize_case:
            candidate, changed = normalised_case(raw)
            normalised += changed
        reasons = _reasons(model, candidate, scope)
        if isinstance(reasons, tuple):
            rejections.append(Rejection(position, raw, reasons))
            continue
        accepted.append(columns(reasons, candidate, position))
    return ValidatedPage(accepted=accepted, rejections=rejections, normalised=normalised)


def normalised_case(raw: Raw) -> tuple[Raw, int]:
    """Canonicalise the case of `consent` and `gender` (`YES` → `Yes`); count the changes."""
    changed = 0
    out = raw
    for field, canon in CASE_CANONICAL.items():
        value = raw.get(field)
        if isinstance(value, str):
            fixed = canon.get(value.strip().lower())
            if fixed is not None and fixed != value:
                if out is raw:
                    out = dict(raw)
                out[field] = fixed
                changed += 1
    return out, changed


def _reasons(model: type[_Record], raw: Raw, scope: Scope) -> _Record | tuple[str, ...]:
    try:
        record = model.model_validate(raw)
    except ValidationError as exc:
        return tuple(_reason(err) for err in exc.errors(include_url=False))
    money = [] if scope is Scope.CUSTOMER or money_ok(raw) else money_problems(raw)
    return tuple(money) if money else record


def _reason(err: Any) -> str:
    field = ".".join(str(part) for part in err["loc"]) or "record"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        message = "required field is missing"
    elif err["type"] == "literal_error" and field in CASE_CANONICAL:
        choices = " or ".join(CASE_CANONICAL[field].values())
        message = (
            f"{err['input']!r} must be exactly {choices} (case matters; the tenant's "
            "normalize_case option accepts other cases)"
        )
    return f"{field}: {message}"


def _customer(record: _Record, raw: Raw, position: int) -> Accepted:
    assert isinstance(record, Customer)
    fields = record.__dict__
    columns: dict[str, Any] = {name: fields[name] for name in CUSTOMER_COLUMNS}
    # extra="allow" keeps every field beyond the declared ones here, in the sent order.
    columns["extra"] = dict(record.__pydantic_extra__ or {})
    return Accepted(record.customer_id, record.last_modified_date, record.deleted_at, columns,
                    position)


def _order(record: _Record, raw: Raw, position: int) -> Accepted:
    assert isinstance(record, Order)
    columns = {"customer_id": record.customer_id, "payload": raw}
    return Accepted(record.order_id, record.last_modified_date, record.deleted_at, columns,
                    position)


def _product(record: _Record, raw: Raw, position: int) -> Accepted:
    assert isinstance(record, Product)
    return Accepted(record.product_id, record.last_modified_date, record.deleted_at,
                    {"payload": raw}, position)


_COLUMNS: dict[Scope, Callable[[_Record, Raw, int], Accepted]] = {
    Scope.CUSTOMER: _customer, Scope.ORDER: _order, Scope.PRODUCT: _product
}


def _kind(value: object) -> str:
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"
