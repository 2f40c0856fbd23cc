"""Parsing the response envelope: every broken shape is a BrokenPageError naming the page."""

from __future__ import annotations

import orjson
import pytest

from puller import errors, protocol
from puller.domain import PageRequest, RecordsWithNul, Scope, Where

WHERE = Where("acme", Scope.ORDER, "7")


def test_parses_a_good_envelope() -> None:
    """status, message, meta and data are read; data records stay raw."""
    body = orjson.dumps({"status": "success", "message": "", "meta": {
        "has_next_page": True, "cursor": "abc", "page": 1, "page_size": 50},
        "data": [{"order_id": "1"}]})
    env = protocol.parse_envelope(body, where=WHERE)
    assert env.meta.has_next_page and env.meta.cursor == "abc" and env.meta.page == 1
    assert env.data == [{"order_id": "1"}] and env.status == "success"


def test_status_and_message_are_optional() -> None:
    """A body with only meta and data is fine."""
    env = protocol.parse_envelope(b'{"meta": {"has_next_page": false}, "data": []}', where=WHERE)
    assert env.status is None and env.data == [] and not env.meta.has_next_page


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"meta": {"has_next_page": tru', "not JSON"),
        (b"<html><body>Login</body></html>", "not JSON"),
        (b"", "not JSON"),
        (b"[1, 2]", "JSON list, not an object"),
        (b'{"data": []}', "`meta` is missing"),
        (b'{"meta": [], "data": []}', "`meta` is a list"),
        (b'{"meta": {}, "data": []}', "`meta.has_next_page` is missing"),
        (b'{"meta": {"has_next_page": "false"}, "data": []}', "'false', not true/false"),
        (b'{"meta": {"has_next_page": false}}', "`data` is missing"),
        (b'{"meta": {"has_next_page": false}, "data": {"a": 1}}', "`data` is a object, not"),
        (b'{"status": 1, "meta": {"has_next_page": false}, "data": []}', "`status` is a number"),
        (b'{"meta": {"has_next_page": true, "cursor": {}}, "data": []}', "`meta.cursor` is a"),
        (b'{"meta": {"has_next_page": true, "cursor": "a\\u0000"}, "data": []}',
         "`meta.cursor` holds a NUL character"),
    ],
    ids=["truncated", "html", "empty", "list", "no-meta", "meta-list", "no-has-next",
         "has-next-string", "no-data", "data-object", "status-number", "cursor-object",
         "cursor-nul"],
)
def test_broken_pages_name_tenant_scope_page_and_cause(body: bytes, fragment: str) -> None:
    """Broken pages fail with the tenant, scope, page and what was wrong."""
    with pytest.raises(errors.BrokenPageError) as info:
        protocol.parse_envelope(body, where=WHERE)
    message = str(info.value)
    assert message.startswith("tenant acme, scope order, page 7: ")
    assert fragment in message


def test_error_status_without_data_is_parsed_for_the_pipeline_to_report() -> None:
    """A tenant-side failure may omit data; the pipeline reports its message."""
    env = protocol.parse_envelope(
        b'{"status": "error", "message": "db down", "meta": {"has_next_page": false}}',
        where=WHERE)
    assert env.status == "error" and env.message == "db down"


@pytest.mark.parametrize(
    ("request_", "params"),
    [(PageRequest(number=3, page_size=50, page=3), {"page": "3", "page_size": "50"}),
     (PageRequest(number=1, page_size=10), {"page_size": "10"}),
     (PageRequest(number=2, page_size=10, cursor="x y"), {"cursor": "x y", "page_size": "10"})],
    ids=["page", "first-cursor", "cursor"],
)
def test_request_params(request_: PageRequest, params: dict[str, str]) -> None:
    """page mode sends page+page_size; cursor mode omits the cursor on the first call."""
    assert protocol.request_params(request_) == params


def test_request_body_identifies_the_shop() -> None:
    """The body is {"shop": ...}."""
    assert orjson.loads(protocol.request_body("acme.example.com")) == {"shop": "acme.example.com"}


def test_a_body_with_a_nul_escape_hands_its_records_on_marked_for_a_closer_look() -> None:
    """JSON carries a NUL character only as the escape \\u0000: a body that has it hands
    its records on as RecordsWithNul (validated record by record); any other as a list."""
    plain = protocol.parse_envelope(orjson.dumps({"meta": {"has_next_page": False},
                                                  "data": [{"a": "x"}]}), where=WHERE)
    marked = protocol.parse_envelope(orjson.dumps({"meta": {"has_next_page": False},
                                                   "data": [{"a": "x\x00y"}]}), where=WHERE)
    assert not isinstance(plain.data, RecordsWithNul)
    assert isinstance(marked.data, RecordsWithNul) and marked.data == [{"a": "x\x00y"}]
