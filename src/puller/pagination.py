"""The page/cursor state machine of one sweep: what to ask next, loops and the page ceiling."""

from __future__ import annotations

from dataclasses import dataclass, field

from puller.domain import Checkpoint, PageMeta, PageRequest, PaginationMode, Where


@dataclass(slots=True)
class Paginator:
    """Walks one sweep; a fresh one per run, resumed from the stored checkpoint.

    `max_pages` bounds the whole sweep (counted across resumed runs), so a tenant whose
    export never ends fails at the same page every time instead of looping forever.
    """

    mode: PaginationMode
    page_size: int
    max_pages: int
    start: Checkpoint = field(default_factory=Checkpoint)
    _seen_cursors: set[str] = field(default_factory=set)

    def first(self) -> PageRequest:
        """The first page this run asks for: the checkpoint's, or page 1 of a fresh sweep."""
        start = self.start
        if self.mode == "page":
            return PageRequest(
                number=start.next_number, page_size=self.page_size,
                page=start.next_page or start.next_number,
            )
        if start.next_cursor is not None:
            self._seen_cursors.add(start.next_cursor)
        return PageRequest(
            number=start.next_number, page_size=self.page_size, cursor=start.next_cursor
        )

    def advance(self, current: PageRequest, meta: PageMeta, *, where: Where) -> PageRequest | None:
        """The request after `current`, or None when the sweep is complete.

        Raises:
            errors.BrokenPageError: a repeated or missing cursor, or the page ceiling passed.
        """
        if not meta.has_next_page:
            return None
        if current.number >= self.max_pages:
            raise where.broken(
                f"the tenant says there are more pages after {current.number}, the ceiling "
                f"max_pages={self.max_pages}; if the export is really this long, raise "
                "max_pages, otherwise report the endless export to the tenant"
            )
        if self.mode == "page":
            return self._page_after(current)
        return PageRequest(number=current.number + 1, page_size=self.page_size,
                           cursor=self._next_cursor(meta, where=where))

    def predict(self, current: PageRequest) -> PageRequest | None:
        """In page mode, the request `advance` returns after `current` if the tenant says
        there are more pages (parallel_pages asks for it before knowing); else None."""
        if self.mode != "page" or current.number >= self.max_pages:
            return None
        return self._page_after(current)

    def _page_after(self, current: PageRequest) -> PageRequest:
        number = current.number + 1
        return PageRequest(number=number, page_size=self.page_size, page=number)

    def _next_cursor(self, meta: PageMeta, *, where: Where) -> str:
        cursor = meta.cursor
        if cursor is None:
            raise where.broken(
                "`meta.cursor` is missing although `has_next_page` is true; "
                "report it to the tenant"
            )
        if cursor in self._seen_cursors:
            raise where.broken(
                f"cursor {cursor[:40]!r} repeated — the tenant's export is looping; "
                "report it to the tenant"
            )
        self._seen_cursors.add(cursor)
        return cursor


def checkpoint_after(request: PageRequest | None) -> Checkpoint:
    """The checkpoint to store with a page: the next request, or a fresh sweep when done."""
    if request is None:
        return Checkpoint()
    return Checkpoint(
        next_number=request.number, next_page=request.page, next_cursor=request.cursor
    )


def meta_mismatch(request: PageRequest, meta: PageMeta) -> str | None:
    """A warning when the tenant's informational `meta.page`/`page_size` differ from the ask."""
    problems = []
    if request.page is not None and meta.page is not None and meta.page != request.page:
        problems.append(f"meta.page={meta.page} but page {request.page} was asked")
    if meta.page_size is not None and meta.page_size != request.page_size:
        problems.append(f"meta.page_size={meta.page_size} but {request.page_size} was asked")
    return "; ".join(problems) or None
