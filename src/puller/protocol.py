"""The callback wire format: request params and body, and strict parsing of the response."""

from __future__ import annotations

import contextlib
import json
from datetime import datetime
from typing import Any

import orjson

from puller.domain import Envelope, PageMeta, PageRequest, RecordsWithNul, Scope, Where

SUCCESS = "success"


def request_params(request: PageRequest) -> dict[str, str]:
    """Query parameters for one page (SPEC §1): `page`+`page_size` or `cursor`+`page_size`."""
    params = {"page_size": str(request.page_size)}
    if request.page is not None:
        params["page"] = str(request.page)
    elif request.cursor is not None:
        params["cursor"] = request.cursor
    return params


def request_body(shop: str) -> bytes:
    """The JSON body that identifies the shop."""
    return orjson.dumps({"shop": shop})


def parse_envelope(body: bytes, *, where: Where) -> Envelope:
    """Decode and shape-check a response body.

    Raises:
        errors.BrokenPageError: not JSON, not an object, `meta`/`has_next_page`/`data` wrong.
    """
    try:
        tree = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        start = body[:60].decode("utf-8", "replace").strip()
        raise where.broken(
            f"response is not JSON ({exc.msg}); it starts with {start!r} — "
            "check that the callback URL points at the export endpoint"
        ) from None
    if _may_hold_wide_integers(body):
        # Valid JSON (orjson read it), its integers exact. Nested ~1,000 levels, the
        # standard library's parser gives up: orjson's reading stays (such a record is
        # rejected anyway, shapes.MAX_DEPTH).
        with contextlib.suppress(RecursionError):
            tree = json.loads(body)
    if not isinstance(tree, dict):
        raise where.broken(f"response is a JSON {_kind(tree)}, not an object; {_FIX}")
    status, message = _status(tree, where)
    data = _data(tree, where)
    if _NUL in body:  # JSON has a NUL character only as this escape
        data = RecordsWithNul(data)
    return Envelope(meta=_meta(tree.get("meta"), where), data=data, status=status,
                    message=message)


_FIX = "the tenant's export breaks the callback protocol; report it to the tenant"
_NUL = b"\\u0000"
_DIGITS = bytes.maketrans(b"0123456789", b"0000000000")
_WIDE = b"0" * 19


def _may_hold_wide_integers(body: bytes) -> bool:
    """Whether `body` has a run of 19 digits or more, where an integer beyond 64 bits
    (above 18446744073709551615, below -9223372036854775808) can be: orjson reads such a
    number as a float, rounded, so such a page is read again by the standard library's
    parser, which keeps it exact. ~0.1 ms a page of 500 customers (134 KB), a third of
    orjson's parse; a page without such a run is not read twice."""
    return _WIDE in body.translate(_DIGITS)


def json_text(value: object, *, indent: bool = False) -> str:
    """`value` as compact JSON text, as stored (or indented by two, as printed): orjson's,
    or, when it holds an integer beyond 64 bits (which orjson refuses), the standard
    library's, that integer exact. Times are written as orjson writes them (RFC 3339)."""
    try:
        if not indent:  # 20% less a call without the option: one call a stored record
            return orjson.dumps(value).decode()
        return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, default=_time_text,
                          **({"indent": 2} if indent else {"separators": (",", ":")}))


def _time_text(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _status(tree: dict[str, Any], where: Where) -> tuple[str | None, str]:
    status = tree.get("status")
    message = tree.get("message")
    if status is not None and not isinstance(status, str):
        raise where.broken(f"`status` is a {_kind(status)}, not a string; {_FIX}")
    if message is None:
        message = ""
    elif not isinstance(message, str):
        message = orjson.dumps(message).decode()
    return status, message[:500]


def _meta(meta: object, where: Where) -> PageMeta:
    if not isinstance(meta, dict):
        missing = "missing" if meta is None else f"a {_kind(meta)}, not an object"
        raise where.broken(f"`meta` is {missing}; {_FIX}")
    has_next = meta.get("has_next_page")
    if not isinstance(has_next, bool):
        missing = "missing" if has_next is None else f"{has_next!r}, not true/false"
        raise where.broken(f"`meta.has_next_page` is {missing}; {_FIX}")
    cursor = meta.get("cursor")
    if cursor is not None and not isinstance(cursor, str | int):
        raise where.broken(f"`meta.cursor` is a {_kind(cursor)}, not a string; {_FIX}")
    if isinstance(cursor, str) and "\x00" in cursor:  # the checkpoint could not be stored
        raise where.broken(f"`meta.cursor` holds a NUL character (\\u0000); {_FIX}")
    return PageMeta(
        has_next_page=has_next,
        cursor=None if cursor is None or cursor == "" else str(cursor),
        page=_int_or_none(meta.get("page")),
        page_size=_int_or_none(meta.get("page_size")),
    )


def _data(tree: dict[str, Any], where: Where) -> list[Any]:
    data = tree.get("data")
    if data is None:
        if tree.get("status", SUCCESS) != SUCCESS:
            return []
        raise where.broken(f"`data` is missing; {_FIX}")
    if not isinstance(data, list):
        raise where.broken(f"`data` is a {_kind(data)}, not a list; {_FIX}")
    return data


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _kind(value: object) -> str:
    return {
        dict: "object", list: "list", str: "string", bool: "boolean", int: "number",
        float: "number", type(None): "null",
    }.get(type(value), type(value).__name__)


def ack_body(
    *, shop: str, scope: Scope, request: PageRequest, run_id: int, accepted: int, rejected: int
) -> bytes:
    """The delivery acknowledgement POSTed to `commit_url` after a page is stored (SPEC §1)."""
    return orjson.dumps({
        "shop": shop, "scope": scope.value, "page": request.page, "cursor": request.cursor,
        "accepted": accepted, "rejected": rejected, "run_id": run_id,
    })
