"""Newest-wins inside a page."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from puller.domain import Accepted
from puller.merge import is_newer, newest_per_id

T0 = datetime(2024, 12, 1, tzinfo=UTC)


def _rec(record_id: str, minutes: int, position: int) -> Accepted:
    return Accepted(record_id, T0 + timedelta(minutes=minutes), None, {"v": minutes}, position)


def test_equal_timestamp_is_not_newer() -> None:
    """An equal last_modified_date is stale (re-pulling changes nothing)."""
    assert not is_newer(T0, T0)
    assert is_newer(T0 + timedelta(microseconds=1), T0)
    assert is_newer(T0, None)


def test_duplicate_ids_keep_the_newest_in_page_order() -> None:
    """A duplicated id keeps its newest version; survivors stay in page order."""
    survivors, dropped = newest_per_id(
        [_rec("a", 1, 0), _rec("b", 5, 1), _rec("a", 3, 2), _rec("b", 2, 3), _rec("c", 0, 4)]
    )
    assert [(r.record_id, r.columns["v"]) for r in survivors] == [("b", 5), ("a", 3), ("c", 0)]
    assert dropped == 2


def test_duplicate_with_equal_timestamp_keeps_the_first() -> None:
    """On a tie the earliest wins, as applying the page in order would."""
    survivors, dropped = newest_per_id([_rec("a", 1, 0), _rec("a", 1, 1)])
    assert [r.position for r in survivors] == [0]
    assert dropped == 1
