"""The paginator: page and cursor sweeps, resume, loops and the ceiling."""

from __future__ import annotations

import pytest

from puller import errors
from puller.domain import Checkpoint, PageMeta, PageRequest, Scope, Where
from puller.pagination import Paginator, checkpoint_after, meta_mismatch

WHERE = Where("acme", Scope.CUSTOMER, "x")


def test_page_mode_counts_up_and_stops() -> None:
    """page=1,2,3 …; has_next_page false ends the sweep."""
    p = Paginator(mode="page", page_size=50, max_pages=10)
    first = p.first()
    assert (first.page, first.number) == (1, 1)
    second = p.advance(first, PageMeta(has_next_page=True), where=WHERE)
    assert second is not None and second.page == 2
    assert p.advance(second, PageMeta(has_next_page=False), where=WHERE) is None


def test_cursor_mode_follows_meta_cursor() -> None:
    """No cursor on the first call; then meta.cursor."""
    p = Paginator(mode="cursor", page_size=50, max_pages=10)
    first = p.first()
    assert first.cursor is None and first.page is None
    nxt = p.advance(first, PageMeta(has_next_page=True, cursor="c2"), where=WHERE)
    assert nxt is not None and nxt.cursor == "c2" and nxt.number == 2


def test_repeated_cursor_is_a_loop() -> None:
    """A cursor seen before in this sweep fails the run: the export is looping."""
    p = Paginator(mode="cursor", page_size=50, max_pages=10)
    r1 = p.first()
    r2 = p.advance(r1, PageMeta(has_next_page=True, cursor="a"), where=WHERE)
    assert r2 is not None
    r3 = p.advance(r2, PageMeta(has_next_page=True, cursor="b"), where=WHERE)
    assert r3 is not None
    with pytest.raises(errors.BrokenPageError, match=r"repeated .* looping"):
        p.advance(r3, PageMeta(has_next_page=True, cursor="a"), where=WHERE)


def test_resumed_cursor_counts_as_seen() -> None:
    """After a resume, a tenant handing back the checkpoint's cursor is a loop too."""
    p = Paginator(mode="cursor", page_size=5, max_pages=10,
                  start=Checkpoint(next_number=4, next_cursor="k"))
    first = p.first()
    assert first.cursor == "k" and first.number == 4
    with pytest.raises(errors.BrokenPageError, match="repeated"):
        p.advance(first, PageMeta(has_next_page=True, cursor="k"), where=WHERE)


def test_missing_cursor_with_more_pages_is_broken() -> None:
    """cursor mode needs meta.cursor while has_next_page is true."""
    p = Paginator(mode="cursor", page_size=50, max_pages=10)
    with pytest.raises(errors.BrokenPageError, match=r"`meta\.cursor` is missing"):
        p.advance(p.first(), PageMeta(has_next_page=True), where=WHERE)


def test_ceiling_counts_the_whole_sweep_across_resumes() -> None:
    """max_pages bounds the sweep, so an endless export fails at the same page every run."""
    p = Paginator(mode="page", page_size=5, max_pages=3, start=Checkpoint(next_number=3,
                                                                          next_page=3))
    third = p.first()
    with pytest.raises(errors.BrokenPageError, match="max_pages=3"):
        p.advance(third, PageMeta(has_next_page=True), where=WHERE)
    assert p.advance(third, PageMeta(has_next_page=False), where=WHERE) is None


def test_checkpoint_after_a_finished_sweep_is_fresh() -> None:
    """A finished sweep resets the checkpoint to page 1 (SPEC §3)."""
    assert checkpoint_after(None) == Checkpoint()
    assert checkpoint_after(PageRequest(number=4, page_size=5, page=4)) == Checkpoint(4, 4, None)


@pytest.mark.parametrize(
    ("meta", "warning"),
    [(PageMeta(True, page=2, page_size=50), None),
     (PageMeta(True), None),
     (PageMeta(True, page=3, page_size=50), "meta.page=3 but page 2 was asked"),
     (PageMeta(True, page=2, page_size=10), "meta.page_size=10 but 50 was asked")],
    ids=["match", "absent", "page-differs", "size-differs"],
)
def test_meta_mismatch_is_a_warning_fact(meta: PageMeta, warning: str | None) -> None:
    """A mismatch of informational meta is reported, not fatal."""
    assert meta_mismatch(PageRequest(number=2, page_size=50, page=2), meta) == warning
