"""What a record may hold that no field's rule covers (SPEC §2): money-shaped objects
anywhere in it, how deep it nests, NUL characters. Used by the record rules (records) on
both paths, the fast one asking only yes or no (money_ok, nests_too_deep), the
explaining one saying where and why (money_problems, nul_at)."""

from __future__ import annotations

import re
from typing import Any

from puller.domain import Raw

_CURRENCY = re.compile(r"^[A-Z]{3}$")
_MONEY_KEYS = frozenset({"amount", "precision", "currency"})


MAX_DEPTH = 200
"""How many levels of objects and arrays a record may nest, the record itself the first.
orjson reads pages nested up to 1,024 levels but writes at most 254, and Python's own
recursion (the fallback JSON writer, pickling to the fetch process, the money check) ends
below 500: a record nested deeper than this is rejected, with TOO_DEEP, instead of
failing its page at every sweep."""
TOO_DEEP = (f"record: nests objects or arrays more than {MAX_DEPTH} levels deep; puller "
            f"keeps records up to {MAX_DEPTH} levels — report it to the tenant")


class TooDeep(ValueError):
    """A record nested deeper than MAX_DEPTH."""


def nests_too_deep(value: object, limit: int = MAX_DEPTH) -> bool:
    """Whether `value` (a record, or its extra fields) nests objects or arrays more than
    `limit` levels, itself the first; without recursion, so that it works at any depth."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, (dict, list)))
    return False


def too_deep_copy(raw: object) -> object:
    """What rejected_records keeps of a record: all of it, but what is nested too deep
    (which cannot be written as JSON), replaced by a note; for an object, field by field."""
    note = f"(not kept: nested more than {MAX_DEPTH} levels deep)"
    if isinstance(raw, dict):
        return {key: note if nests_too_deep(value, MAX_DEPTH - 1) else value
                for key, value in raw.items()}
    return note if nests_too_deep(raw) else raw


def money_ok(record: object) -> bool:
    """Whether money_problems finds nothing in `record` and it nests at most MAX_DEPTH
    levels: the same walk without naming the places, which money_problems then does for
    a record that has a problem. 500 orders (make_order's) took 4.5-4.7 ms walked by
    money_problems, mostly making the path of every value, 1.9-2.2 ms so (best of 7)."""
    return _money_ok(record, 1)


def _money_ok(node: object, depth: int) -> bool:
    if isinstance(node, dict):
        if depth > MAX_DEPTH:
            return False
        # Money-shaped (_MONEY_KEYS) and not as _money wants it.
        if ("amount" in node or "precision" in node or "currency" in node) and not (
                _is_int(node.get("amount")) and _is_count(node.get("precision"))
                and _is_currency(node.get("currency"))):
            return False
        children: Any = node.values()
    elif isinstance(node, list):
        if depth > MAX_DEPTH:
            return False
        children = node
    else:
        return True
    depth += 1  # at most MAX_DEPTH + 1 calls deep
    for child in children:  # a loop: all() over a generator took half as long again
        if isinstance(child, (dict, list)) and not _money_ok(child, depth):
            return False
    return True


def money_problems(node: object, path: str = "", depth: int = 1) -> list[str]:
    """Every money-shaped object (`amount`/`precision`/`currency`) anywhere in a record,
    checked. Raises TooDeep for a record nested more than MAX_DEPTH levels (the explaining
    path rejects such a record before it gets here)."""
    if depth > MAX_DEPTH and isinstance(node, (dict, list)):
        raise TooDeep(path)
    problems: list[str] = []
    if isinstance(node, dict):
        if _MONEY_KEYS & node.keys():
            problems.extend(_money(node, path or "record"))
        for key, value in node.items():
            problems.extend(money_problems(value, f"{path}.{key}" if path else str(key),
                                           depth + 1))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            problems.extend(money_problems(value, f"{path}[{index}]", depth + 1))
    return problems


def _money(node: dict[str, Any], path: str) -> list[str]:
    problems = []
    amount, precision, currency = (node.get(k) for k in ("amount", "precision", "currency"))
    if not _is_int(amount):
        problems.append(
            f"{path}.amount: {amount!r} must be an integer in the smallest currency unit "
            "(19999 with precision 2 for 199.99)"
        )
    if not _is_count(precision):
        problems.append(f"{path}.precision: {precision!r} must be a non-negative integer")
    if not _is_currency(currency):
        problems.append(f"{path}.currency: {currency!r} must be a 3-letter ISO 4217 code")
    return problems


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_currency(value: object) -> bool:
    return isinstance(value, str) and _CURRENCY.match(value) is not None


def nul_at(raw: Raw) -> str | None:
    """Where the record has a NUL character, in a key or a text, if anywhere (the first
    found); the record is at most MAX_DEPTH levels deep."""
    def find(node: object, path: str) -> str | None:
        if isinstance(node, str):
            return path if "\x00" in node else None
        items: Any = (node.items() if isinstance(node, dict) else
                      enumerate(node) if isinstance(node, list) else ())
        for key, value in items:
            name = str(key).replace("\x00", "\ufffd")
            inner = f"{path}[{name}]" if isinstance(node, list) else (
                f"{path}.{name}" if path else name)
            if isinstance(key, str) and "\x00" in key:
                return inner
            found = find(value, inner)
            if found is not None:
                return found
        return None
    return find(raw, "")


def without_nul(node: Any) -> Any:
    """A copy of a record with every NUL character (in keys and texts) as U+FFFD."""
    if isinstance(node, str):
        return node.replace("\x00", "\ufffd")
    if isinstance(node, dict):
        return {without_nul(key): without_nul(value) for key, value in node.items()}
    if isinstance(node, list):
        return [without_nul(value) for value in node]
    return node
