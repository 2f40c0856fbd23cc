"""Property-based: validation and config loading never crash on arbitrary input."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from pydantic import StringConstraints, TypeAdapter, ValidationError

from puller import errors, fast_rules, forms, pg_store, protocol, shapes, sqlite_store
from puller import records as rules
from puller.config import PullerConfig, load_config
from puller.domain import Checkpoint, Scope, StoreRows, Where
from puller.records import validate_page
from puller.tenant_server import make_customer, make_order, make_product
from tests.conftest import nested_arrays

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63 - 2)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12,
)
FIELDS = sorted({*make_customer(0), *make_order(0), *make_product(0), "deleted_at"})


@st.composite
def records(draw: st.DrawFn) -> Any:
    """Arbitrary JSON, or a valid record with some fields replaced by arbitrary JSON."""
    if draw(st.booleans()):
        return draw(json_values)
    base = draw(st.sampled_from([make_customer(1), make_order(1), make_product(1)]))
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=4)):
        base[field] = draw(json_values)
    return base


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(raws=st.lists(records(), max_size=8), scope=st.sampled_from(list(Scope)),
       normalize=st.booleans())
def test_validation_never_raises_and_accounts_for_every_record(
    raws: list[Any], scope: Scope, normalize: bool
) -> None:
    """Any page validates without raising; every record is accepted or rejected with
    reasons; what is accepted and what is rejected can be written to either store."""
    page = validate_page(scope, raws, normalize_case=normalize)
    positions = sorted([a.position for a in page.accepted] + [r.position for r in page.rejections])
    assert positions == list(range(len(raws)))
    assert all(r.reasons and all(isinstance(x, str) and x for x in r.reasons)
               for r in page.rejections)
    now = datetime.now(UTC)
    for dialect in ("sqlite", "postgresql"):
        rows = forms.prepare(page.accepted, scope, dialect)
        assert pickle.loads(pickle.dumps(rows)) == rows  # noqa: S301 - as the fetch process sends them
    sqlite_store.rejection_rows(page.rejections, scope, tenant="t", run_id=1, page="1", now=now)
    pg_store.page_params("[]", page.rejections, Checkpoint(), scope, tenant="t", run_id=1,
                          page="1", offered=len(raws), normalised=0, now=now)


yaml_docs = st.one_of(
    st.text(max_size=200),
    json_values.map(yaml.safe_dump),
    st.fixed_dictionaries({}, optional={
        "store": json_values, "retry": json_values, "worker": json_values,
        "tenants": st.lists(st.fixed_dictionaries({}, optional={
            "id": json_values | st.text(max_size=10), "shop": json_values,
            "headers": json_values, "callbacks": json_values | st.dictionaries(
                st.sampled_from(["customer", "2", "product", "x"]), json_values, max_size=3),
        }), max_size=3),
    }).map(yaml.safe_dump),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(text=yaml_docs, env=st.dictionaries(st.from_regex(r"[A-Z]{1,5}", fullmatch=True),
                                           st.text(max_size=10), max_size=3))
def test_config_loader_never_crashes(text: str, env: dict[str, str]) -> None:
    """Any YAML text gives a config or a ConfigError, never another exception."""
    try:
        result = load_config(text, env)
    except errors.ConfigError as exc:
        assert str(exc).startswith("config ")
    else:
        assert isinstance(result, PullerConfig)


tricky_text = st.text(alphabet=st.sampled_from(
    [*"aZ09@.-_+ ()<>:;,[]\\\"'é", "\n", "\t", "\x1c", "\x1f", "\x85", "\xa0", "\u2028",
                                          "\u3000", "\u200b", "\ufeff"]), max_size=12)
timestamps = st.one_of(
    st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)),
                                            timezone(-timedelta(hours=8))]))
    .map(lambda d: d.isoformat()),
    st.datetimes().map(lambda d: d.isoformat()),  # no offset: refused by both paths
    st.from_regex(r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,7})?"
                  r"(Z|[+-][0-9]{2}:[0-9]{2})?\Z"),
    st.sampled_from(["2024-12-01T10:30:00Z", "2024-12-01 10:30:00+00:00", "20241201T103000Z",
                     "2024-02-30T00:00:00Z", "2024-12-01T24:00:00Z", "2024-12-01T10:30:00+25:00"]),
)
field_values = st.one_of(
    tricky_text, timestamps, st.integers(min_value=-(2**70), max_value=2**70), st.none(),
    st.booleans(), st.sampled_from(["Yes", "No", "Male", "Female", "yes", "en", "en-US", "x" * 101,
                                    "a@b.c", "a@b.c\n", "en\n", " ", "\x1c"]),
    st.text(max_size=3).map(lambda t: "user@example.com" + t),
)


@st.composite
def near_valid_records(draw: st.DrawFn) -> tuple[Scope, dict[str, Any]]:
    """A valid record of a scope with some fields replaced by edge-case values."""
    scope = draw(st.sampled_from(list(Scope)))
    make = {Scope.CUSTOMER: make_customer, Scope.ORDER: make_order,
            Scope.PRODUCT: make_product}[scope]
    record = make(draw(st.integers(min_value=0, max_value=50)))
    if scope is Scope.CUSTOMER and draw(st.booleans()):  # no field beyond the declared ones
        del record["loyalty_tier"]
    for field in draw(st.lists(st.sampled_from([*record, "deleted_at", "extra_key"]),
                               max_size=3)):
        record[field] = draw(field_values)
    if draw(st.booleans()):  # the fields in any order: an extra one may come first
        record = dict(draw(st.permutations(list(record.items()))))
    return scope, record


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(case=near_valid_records())
def test_the_fast_path_accepts_only_what_the_rules_accept_and_yields_the_same(
    case: tuple[Scope, dict[str, Any]],
) -> None:
    """The one-call page validation never accepts more than the per-record rules, and what
    it accepts it turns into exactly the same stored values."""
    scope, record = case
    valid = rules._fast_valid(scope, [record], normalize_case=False)
    fast = None if valid is None else fast_rules.accepted_page(scope, valid[0], valid[1])
    explained = rules._slow_page(scope, [record], normalize_case=False)
    event("fast path took it" if fast is not None else
          "rules accepted, fast path refused" if explained.accepted else "both refused")
    if fast is not None:
        assert explained.rejections == []
        assert fast == explained.accepted


def test_fast_blank_check_agrees_with_python_on_every_code_point() -> None:
    """Rust's \\s and Python's str.isspace differ; the fast pattern makes up the difference."""
    adapter = TypeAdapter(list[Annotated[str, StringConstraints(
        pattern=f"^{fast_rules._FAST_NOT_BLANK}$")]])
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    try:
        adapter.validate_python(chars)
        refused: set[str] = set()
    except ValidationError as exc:
        refused = {chars[err["loc"][0]] for err in exc.errors()}  # type: ignore[index]
    assert refused == {c for c in chars if c.isspace()}


# Valid UTC times written with Z, whole seconds or not: the shape upsert copies as text.
z_times = st.builds(
    lambda moment, spec: moment.isoformat(timespec=spec).replace("+00:00", "Z"),
    st.datetimes(timezones=st.just(UTC)),
    st.sampled_from(["seconds", "milliseconds", "microseconds", "auto"]))


@st.composite
def customer_pages(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A page of near-valid customers: ids that may repeat or be integers, timestamps of
    every shape, deleted_at or not, extra fields or none, in any order, a case to normalise; as
    protocol.parse_envelope hands them on (an integer beyond 64 bits exact)."""
    page = []
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        record = make_customer(draw(st.integers(min_value=0, max_value=3)))
        if draw(st.booleans()):
            record["customer_id"] = draw(st.integers(min_value=-(2**40), max_value=2**40)
                                         | st.sampled_from(["c1", "c2", " c1", "c1 "]))
        if draw(st.booleans()):  # no field beyond the declared ones
            del record["loyalty_tier"]
        for field in draw(st.lists(st.sampled_from(["last_modified_date", "deleted_at",
                                                    "zz_extra", "a_extra", "consent"]),
                                   max_size=3)):
            record[field] = draw(timestamps | z_times | field_values
                                 | st.sampled_from(["YES", "no"]))
        if draw(st.booleans()):
            record = dict(draw(st.permutations(list(record.items()))))
        page.append(record)
    return _parsed(page)


def _parsed(data: list[Any]) -> list[Any]:
    """`data` as protocol.parse_envelope hands a page's records on."""
    body = json.dumps({"meta": {"has_next_page": False}, "data": data}).encode()
    return protocol.parse_envelope(body, where=Where("t", Scope.CUSTOMER, "1")).data


@settings(max_examples=800, suppress_health_check=[HealthCheck.too_slow])
@given(page=customer_pages(), normalize=st.booleans(),
       dialect=st.sampled_from(["sqlite", "postgresql"]))
def test_customer_rows_are_what_prepare_makes_of_the_validated_records(
    page: list[dict[str, Any]], normalize: bool, dialect: str,
) -> None:
    """The fetch process's shortcut (forms.customer_rows from records.valid_customers)
    stores exactly what validating and preparing the page stores, or declines; it declines
    only pages with a repeated id (or a date that is no date), which then go the long way."""
    valid = rules.valid_customers(page, normalize_case=normalize)
    rows = None if valid is None else forms.customer_rows(valid, dialect)
    _stored_as_the_long_way_stores(Scope.CUSTOMER, page, normalize, dialect, valid, rows)


def _stored_as_the_long_way_stores(
    scope: Scope, page: list[dict[str, Any]], normalize: bool, dialect: str,
    valid: rules.ValidCustomers | rules.ValidPayloads | None, rows: StoreRows | None,
) -> None:
    """A shortcut's `rows` of `page` (from `valid`, the fast path's) are what preparing
    validate_page's records makes; or it declined a page with a repeated id or a date that
    is no date; or the fast path refused the page (validate_page decides and explains)."""
    page_result = validate_page(scope, page, normalize_case=normalize)
    if valid is None:
        event("the fast path refused the page")
        return
    expected = forms.prepare(page_result.accepted, scope, dialect)
    if rows is None:
        event("the shortcut declined")
        assert expected.duplicates > 0 or page_result.rejections
        return
    event("the shortcut took it")
    assert page_result.rejections == []
    assert valid.normalised == page_result.normalised
    assert rows == expected


money = st.one_of(
    st.builds(lambda amount, precision, currency: {"amount": amount, "precision": precision,
                                                   "currency": currency},
              st.integers(min_value=-5, max_value=2**70), st.integers(min_value=-1, max_value=4),
              st.sampled_from(["EUR", "usd", "GBP"])),
    st.sampled_from([{"amount": 1.5, "precision": 2, "currency": "EUR"}, {"amount": 5}]))


@st.composite
def payload_pages(draw: st.DrawFn, scope: Scope) -> list[dict[str, Any]]:
    """A page of near-valid orders or products: ids that may repeat or be integers,
    timestamps of every shape, deleted_at or not, money right or wrong, other fields (a
    case to normalise among them), in any order; as protocol.parse_envelope hands them on."""
    make = make_order if scope is Scope.ORDER else make_product
    page = []
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        record = make(draw(st.integers(min_value=0, max_value=3)))
        if draw(st.booleans()):
            record[scope.id_field] = draw(st.integers(min_value=-(2**40), max_value=2**40)
                                          | st.sampled_from(["o1", "p1", " o1", "x"]))
        for field in draw(st.lists(st.sampled_from(["last_modified_date", "deleted_at",
                                                    "total", "gender", "zz_note"]),
                                   max_size=3)):
            record[field] = draw(timestamps | z_times | money | field_values
                                 | st.sampled_from(["MALE", "female"]))
        if draw(st.booleans()):
            record = dict(draw(st.permutations(list(record.items()))))
        page.append(record)
    return _parsed(page)


@settings(max_examples=800, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), scope=st.sampled_from([Scope.ORDER, Scope.PRODUCT]),
       normalize=st.booleans(), dialect=st.sampled_from(["sqlite", "postgresql"]))
def test_payload_rows_are_what_prepare_makes_of_the_validated_records(
    data: st.DataObject, scope: Scope, normalize: bool, dialect: str,
) -> None:
    """The fetch process's shortcut for orders and products (forms.payload_rows from
    records.valid_payloads) stores exactly what validating and preparing the page stores,
    or declines; it declines only pages with a repeated id (or a date that is no date),
    which then go the long way."""
    page = data.draw(payload_pages(scope))
    valid = rules.valid_payloads(scope, page, normalize_case=normalize)
    rows = None if valid is None else forms.payload_rows(scope, valid, dialect)
    _stored_as_the_long_way_stores(scope, page, normalize, dialect, valid, rows)


any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63 - 2)
    | st.integers(max_value=-(2**63) + 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12,
)


money_parts = st.one_of(
    st.integers(min_value=-3, max_value=2**70), st.booleans(), st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["EUR", "usd", "EUR\n", "EURO", "", "GB"]), st.text(max_size=4))
money_trees = st.recursive(
    money_parts | st.dictionaries(st.sampled_from(["amount", "precision", "currency", "x"]),
                                  money_parts, max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["amount", "precision", "currency", "total", "lines", "price"]),
        inner, max_size=4),
    max_leaves=16)


@settings(max_examples=600)
@given(record=money_trees)
def test_money_ok_is_money_problems_finding_nothing(record: Any) -> None:
    """shapes.money_ok, the validators' quick walk, says a record is fine exactly when
    money_problems finds no problem in it: money-shaped objects anywhere, with amounts,
    precisions and currencies of every kind, half-shaped ones, none."""
    ok = shapes.money_ok(record)
    assert ok == (shapes.money_problems(record) == [])
    event("fine" if ok else "a problem")


def test_money_ok_refuses_what_nests_too_deep_as_money_problems_does() -> None:
    """A record nested more than MAX_DEPTH levels is not fine (money_problems raises
    TooDeep for it); one nested exactly MAX_DEPTH levels is."""
    deepest = {"total": nested_arrays(shapes.MAX_DEPTH - 1)}
    assert shapes.money_ok(deepest) and shapes.money_problems(deepest) == []
    too_deep = {"total": nested_arrays(shapes.MAX_DEPTH)}
    assert not shapes.money_ok(too_deep)
    with pytest.raises(shapes.TooDeep):
        shapes.money_problems(too_deep)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(pages=st.lists(st.dictionaries(
    st.text(max_size=12).filter(lambda key: key not in fast_rules.CUSTOMER_FIELDS), any_json,
    max_size=3), min_size=1, max_size=4))
def test_the_extra_fields_text_in_sqlite_rows_is_json_text_of_the_extra_fields(
    pages: list[dict[str, Any]],
) -> None:
    """forms.extra_texts, which writes one extra field without its dict, gives for each
    record of a page the text json_text gives of fast_rules.extra_fields' dict: any JSON
    value (integers beyond 64 bits, objects, texts to escape), any name, no field, one or
    several, the page's records in several layouts (each found once)."""
    page = _customers_with(pages, first=lambda number: number % 2 == 1)
    valid = rules.valid_customers(_parsed(page))
    if valid is None:  # a NUL character: such a page goes the long way, where it is rejected
        assert "\\u0000" in json.dumps(page)
        event("a NUL character")
        return
    _assert_extra_texts_are_json_text(valid)


def _customers_with(extras: list[dict[str, Any]], *,
                    first: Callable[[int], bool]) -> list[dict[str, Any]]:
    """A page of customers, the nth with the fields extras[n] beyond the declared ones,
    before them where `first(n)`, after them elsewhere."""
    page = []
    for number, extra in enumerate(extras):
        record = make_customer(number)
        del record["loyalty_tier"]
        page.append({**extra, **record} if first(number) else {**record, **extra})
    return page


def _assert_extra_texts_are_json_text(valid: rules.ValidCustomers) -> None:
    as_text, as_dict = forms.extra_texts(), fast_rules.extra_fields()
    for record, sent in zip(valid.records, valid.sent, strict=True):
        assert as_text(record, sent) == protocol.json_text(as_dict(record, sent))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(pages=st.lists(st.dictionaries(st.sampled_from(["tier", "vip", ""]), any_json,
                                      max_size=2), min_size=2, max_size=8))
def test_the_extra_fields_text_is_right_when_records_share_their_extra_field(
    pages: list[dict[str, Any]],
) -> None:
    """As above, with the extra fields' names drawn from a few, so that a record's one
    extra field is often the one of the record before (which extra_texts then knows
    without its keys' layout), or was, or is one of two."""
    valid = rules.valid_customers(_parsed(_customers_with(
        pages, first=lambda number: number % 3 == 1)))
    assume(valid is not None)  # a NUL character: the long way (the test above)
    assert valid is not None
    _assert_extra_texts_are_json_text(valid)


@settings(max_examples=400)
@given(value=any_json)
def test_every_number_is_read_and_stored_as_sent(value: Any) -> None:
    """A page is read with every integer exact, beyond 64 bits too (where orjson alone
    reads a float), and stored as JSON text that reads back the same: orjson's text where
    orjson can write it."""
    assert _parsed([value]) == [value]
    text = protocol.json_text(value)
    assert json.loads(text) == value
    try:
        assert text == orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        event("beyond 64 bits: the standard library's text")
