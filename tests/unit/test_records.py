"""Record rules of SPEC §2: every rule rejects with a reason; nothing is dropped silently."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from puller import forms, records, shapes, sqlite_store
from puller.domain import RecordsWithNul, Scope
from puller.records import validate_page
from puller.shapes import money_problems
from puller.tenant_server import make_customer, make_order, make_product
from tests.conftest import nested_arrays


def _only_reasons(scope: Scope, record: Any, **kw: Any) -> tuple[str, ...]:
    page = validate_page(scope, [record], **kw)
    assert len(page.rejections) == 1, page.accepted
    return page.rejections[0].reasons


def test_valid_customer_keeps_extra_fields_and_stores_utc() -> None:
    """A valid customer is accepted; unknown fields go to `extra`; timestamps become UTC."""
    raw = make_customer(1, last_modified_date="2024-12-01T11:30:00+01:00", note="ünïcode")
    page = validate_page(Scope.CUSTOMER, [raw])
    (rec,) = page.accepted
    assert rec.record_id == "c1"
    assert rec.last_modified_at == datetime(2024, 12, 1, 10, 30, tzinfo=UTC)
    assert rec.columns["extra"] == {"loyalty_tier": "silver", "note": "ünïcode"}
    assert rec.columns["first_name"] == raw["first_name"]


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"customer_id": None}, "customer_id: required field is missing"),
        ({"email": ""}, "email: String should have at least 1 character"),
        ({"first_name": "   "}, "first_name: must not be empty or blank"),
        ({"gender": "male"}, "gender: 'male' must be exactly Male or Female"),
        ({"gender": "Other"}, "gender: 'Other' must be exactly Male or Female"),
        ({"consent": "YES"}, "consent: 'YES' must be exactly Yes or No"),
        ({"consent": True}, "consent: True must be exactly Yes or No"),
        ({"email": "john@"}, "email: 'john@' is not a valid email address"),
        ({"email": "a b@example.com"}, "is not a valid email address"),
        ({"last_modified_date": "2024-12-01 10:30"}, "has no UTC offset"),
        ({"last_modified_date": "yesterday"}, "is not an ISO 8601 timestamp"),
        ({"last_modified_date": 1733049000}, "must be an ISO 8601 timestamp string"),
        ({"customer_id": "x" * 101}, "customer_id: is 101 characters; at most 100 are allowed"),
        ({"email": "a@" + "b" * 250 + ".com"}, "email: String should have at most 255"),
        ({"first_name": "n" * 101}, "first_name: String should have at most 100"),
        ({"last_name": "n" * 301}, "last_name: String should have at most 300"),
        ({"mobile": "+" + "1" * 20}, "mobile: String should have at most 20"),
        ({"language": "english-UK1"}, "language: String should have at most 10"),
        ({"language": "e1"}, "language: 'e1' is not a language tag"),
        ({"mobile": 123456}, "mobile: Input should be a valid string"),
        ({"deleted_at": "later"}, "deleted_at: 'later' is not an ISO 8601 timestamp"),
        ({"email": "a@example.com\n"}, "is not a valid email address"),
        ({"last_modified_date": "2024-13-01T10:30:00Z"}, "is not an ISO 8601 timestamp"),
        ({"first_name": "\x1c\x1f"}, "first_name: must not be empty or blank"),
        ({"last_modified_date": "0001-01-01T00:00:00+05:30"}, "outside the years 1 to 9999"),
        ({"deleted_at": "9999-12-31T23:59:59-05:00"}, "deleted_at: '9999-12-31T23:59:59-05:00'"
                                                      " is outside the years 1 to 9999"),
    ],
    ids=["missing-id", "empty-email", "blank-name", "gender-case", "gender-other", "consent-YES",
         "consent-bool", "email-no-domain", "email-space", "naive-timestamp", "bad-timestamp",
         "epoch-timestamp", "long-id", "long-email", "long-first", "long-last", "long-mobile",
         "long-language", "bad-language", "mobile-number", "bad-deleted-at",
         "email-newline", "month-13", "separator-chars-only", "before-year-1-in-utc",
         "after-year-9999-in-utc"],
)
def test_customer_rules_reject_with_a_reason(override: dict[str, Any], reason: str) -> None:
    """Each customer rule rejects the record and says which field and why."""
    reasons = _only_reasons(Scope.CUSTOMER, make_customer(3, **override))
    assert any(reason in r for r in reasons), reasons


def test_every_reason_is_reported_not_only_the_first() -> None:
    """A record breaking several rules lists every reason."""
    reasons = _only_reasons(Scope.CUSTOMER, make_customer(1, email="x", gender="m",
                                                          mobile=None))
    assert [r.split(":")[0] for r in reasons] == ["email", "mobile", "gender"]


def test_language_tags_in_bcp47_style_are_accepted() -> None:
    """en, en-US, fr-CA, zh-Hant are language tags."""
    raws = [make_customer(i, language=tag) for i, tag in enumerate(["en", "en-US", "zh-Hant"])]
    assert len(validate_page(Scope.CUSTOMER, raws).accepted) == 3


def test_strict_mode_rejects_the_guides_YES_and_normalize_case_accepts_and_counts() -> None:
    """Strict by default; normalize_case canonicalises YES/male and counts each value changed."""
    raws = [make_customer(1, consent="YES", gender="male"), make_customer(2, consent="no"),
            make_customer(3)]
    strict = validate_page(Scope.CUSTOMER, raws)
    assert (len(strict.accepted), len(strict.rejections), strict.normalised) == (1, 2, 0)
    lenient = validate_page(Scope.CUSTOMER, raws, normalize_case=True)
    assert len(lenient.accepted) == 3 and lenient.normalised == 3
    assert [r.columns["consent"] for r in lenient.accepted] == ["Yes", "No", "No"]
    assert lenient.accepted[0].columns["gender"] == "Male"
    assert raws[0]["consent"] == "YES", "the raw record is not mutated"


def test_normalize_case_does_not_invent_values() -> None:
    """normalize_case fixes case only: 'Y' or 'other' stay rejected."""
    page = validate_page(Scope.CUSTOMER, [make_customer(1, consent="Y")], normalize_case=True)
    assert page.normalised == 0 and len(page.rejections) == 1


def test_integer_ids_are_accepted_as_text() -> None:
    """An integer id is stored as its decimal string; a boolean id is not an id."""
    page = validate_page(Scope.PRODUCT, [make_product(1, product_id=42),
                                         make_product(2, product_id=True)])
    assert [r.record_id for r in page.accepted] == ["42"]
    assert page.rejections[0].position == 1


@pytest.mark.parametrize(
    ("scope", "record", "reason"),
    [
        (Scope.ORDER, make_order(1, order_id=None), "order_id: required field is missing"),
        (Scope.ORDER, make_order(1, customer_id=None), "customer_id: required field is missing"),
        (Scope.ORDER, make_order(1, last_modified_date=None), "last_modified_date: required"),
        (Scope.PRODUCT, make_product(1, product_id=""), "product_id: must not be empty or blank"),
        (Scope.ORDER, make_order(1, total={"amount": 199.99, "precision": 2, "currency": "USD"}),
         "total.amount: 199.99 must be an integer in the smallest currency unit"),
        (Scope.ORDER, make_order(1, total={"amount": 100, "precision": -1, "currency": "USD"}),
         "total.precision: -1 must be a non-negative integer"),
        (Scope.ORDER, make_order(1, total={"amount": 100, "precision": 2, "currency": "usd"}),
         "total.currency: 'usd' must be a 3-letter ISO 4217 code"),
        (Scope.ORDER, make_order(1, total={"amount": 100, "precision": 2}),
         "total.currency: None must be a 3-letter"),
        (Scope.ORDER, make_order(1, lines=[{"price": {"amount": "9.99", "precision": 2,
                                                       "currency": "EUR"}}]),
         "lines[0].price.amount: '9.99' must be an integer"),
        (Scope.PRODUCT, make_product(1, price={"amount": True, "precision": 2,
                                               "currency": "EUR"}),
         "price.amount: True must be an integer"),
    ],
    ids=["no-order-id", "no-customer-id", "no-timestamp", "empty-product-id", "decimal-amount",
         "negative-precision", "lowercase-currency", "missing-currency", "nested-money",
         "bool-amount"],
)
def test_order_and_product_rules(scope: Scope, record: Any, reason: str) -> None:
    """Order/product keys are required; money is integer amount, precision, ISO currency."""
    reasons = _only_reasons(scope, record)
    assert any(reason in r for r in reasons), reasons


def test_order_payload_keeps_the_whole_record() -> None:
    """An order's payload is the record as sent; the customer id is also a column."""
    raw = make_order(5, note="Lieferung an Böhm")
    (rec,) = validate_page(Scope.ORDER, [raw]).accepted
    assert rec.columns == {"customer_id": raw["customer_id"], "payload": raw}


@pytest.mark.parametrize("raw", [[1, 2], "text", None, 7],
                         ids=["list", "string", "null", "number"])
def test_non_object_records_are_rejected_with_their_position(raw: Any) -> None:
    """A record that is not a JSON object is rejected, and the rest of the page still applies."""
    page = validate_page(Scope.PRODUCT, [make_product(0), raw, make_product(2)])
    assert [r.record_id for r in page.accepted] == ["p0", "p2"]
    (rejection,) = page.rejections
    assert rejection.position == 1 and rejection.raw == raw
    assert "not an object" in rejection.reasons[0]


def test_soft_delete_timestamp_is_read() -> None:
    """deleted_at is an optional timestamp, stored in UTC."""
    (rec,) = validate_page(Scope.PRODUCT, [make_product(1, deleted_at="2025-01-01T00:00:00Z")]
                           ).accepted
    assert rec.deleted_at == datetime(2025, 1, 1, tzinfo=UTC)


def test_money_problems_ignores_plain_objects() -> None:
    """Objects without money keys are not money."""
    assert money_problems({"a": {"b": [1, {"c": "d"}]}}) == []


@pytest.mark.parametrize("scope", list(Scope))
@pytest.mark.parametrize(("levels", "kept"), [(200, True), (201, False), (1023, False)],
                         ids=["200-levels", "201-levels", "1023-levels"])
def test_a_record_nested_too_deep_is_rejected_and_the_rest_of_its_page_stored(
    scope: Scope, levels: int, kept: bool,
) -> None:
    """A record may nest objects and arrays MAX_DEPTH (200) levels deep, itself the first;
    deeper (orjson reads up to 1,024) it is rejected with that reason, its top level kept,
    instead of failing its page at every sweep; the page's other records are stored."""
    make = {Scope.CUSTOMER: make_customer, Scope.ORDER: make_order, Scope.PRODUCT: make_product}
    deep = {**make[scope](1), "zz_deep": nested_arrays(levels - 1)}
    page = validate_page(scope, [make[scope](2), deep])
    now = datetime.now(UTC)
    for dialect in ("sqlite", "postgresql"):
        assert forms.prepare(page.accepted, scope, dialect)
    sqlite_store.rejection_rows(page.rejections, scope, tenant="t", run_id=1, page="1", now=now)
    if kept:
        assert (len(page.accepted), page.rejections) == (2, [])
        return
    (rejection,) = page.rejections
    assert len(page.accepted) == 1 and rejection.position == 1
    assert rejection.reasons == (shapes.TOO_DEEP,)
    assert rejection.raw == {**make[scope](1),
                             "zz_deep": "(not kept: nested more than 200 levels deep)"}
    if scope is Scope.CUSTOMER:
        valid = records.valid_customers([deep])
        assert valid is not None
        assert forms.customer_rows(valid, "sqlite") is None


@pytest.mark.parametrize("scope", list(Scope))
def test_a_record_with_a_nul_character_is_rejected_and_kept_without_it(scope: Scope) -> None:
    """PostgreSQL cannot store a NUL character (\\u0000) in a text or a JSON document: on a
    page whose body had one, a record holding one (in a field, an extra field's name or a
    nested text) is rejected, the reason naming where, its copy showing it as U+FFFD;
    records without one are accepted, as is everything on a page that only looked so."""
    make = {Scope.CUSTOMER: make_customer, Scope.ORDER: make_order, Scope.PRODUCT: make_product}
    field = {Scope.CUSTOMER: "first_name", Scope.ORDER: "currency_note",
             Scope.PRODUCT: "title_note"}[scope]
    raws = RecordsWithNul([
        make[scope](1), {**make[scope](2), field: "a\x00b"},
        {**make[scope](3), "zz\x00key": 1}, {**make[scope](4), "zz": {"deep": ["ok", "\x00"]}},
    ])
    page = validate_page(scope, raws)
    assert [a.position for a in page.accepted] == [0]
    assert [(r.position, r.reasons[0].split(":")[0]) for r in page.rejections] == [
        (1, field), (2, "zz\ufffdkey"), (3, "zz.deep[1]")]
    assert all("NUL character" in r.reasons[0] for r in page.rejections)
    assert page.rejections[0].raw == {**make[scope](2), field: "a\ufffdb"}
    assert page.rejections[1].raw == {**make[scope](3), "zz\ufffdkey": 1}
    assert "\x00" not in orjson.dumps([r.raw for r in page.rejections]).decode()
    look_alike = validate_page(scope, RecordsWithNul([make[scope](5)]))
    assert (len(look_alike.accepted), look_alike.rejections) == (1, [])
    if scope is Scope.CUSTOMER:
        assert records.valid_customers(raws) is None


def test_a_record_that_is_no_object_is_kept_as_far_as_a_store_can_hold_it() -> None:
    """A page's record that is no object is rejected as such; rejected_records keeps it,
    a NUL character in it as U+FFFD and a part nested too deep as a note, so that its
    rejection can be stored at all."""
    page = validate_page(Scope.ORDER, RecordsWithNul(
        ["a\x00b", nested_arrays(1000), 5, nested_arrays(3)]))
    assert [(r.position, r.raw) for r in page.rejections] == [
        (0, "a\ufffdb"), (1, "(not kept: nested more than 200 levels deep)"), (2, 5),
        (3, nested_arrays(3))]
    assert all(r.reasons[0].endswith("not an object") for r in page.rejections)
    now = datetime.now(UTC)
    sqlite_store.rejection_rows(page.rejections, Scope.ORDER, tenant="t", run_id=1, page="1",
                             now=now)
