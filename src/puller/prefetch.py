"""Fetching a sweep's pages ahead of the page being applied, in order, within its slots."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from puller import errors, logs, pagination, protocol, records
from puller.config import CallbackConfig, TenantConfig
from puller.domain import (
    Ack,
    Checkpoint,
    Envelope,
    PageRequest,
    Scope,
    ValidatedPage,
    Where,
)


class PageSource(Protocol):
    """Where pages come from (the tenant's callback)."""

    async def fetch_page(self, request: PageRequest) -> bytes: ...

    async def acknowledge(self, ack: Ack) -> None: ...


@dataclass(frozen=True, slots=True)
class Job:
    """One (tenant, scope) to pull."""

    tenant: TenantConfig
    scope: Scope
    trigger: str = "manual"

    @property
    def callback(self) -> CallbackConfig:
        return self.tenant.callbacks[self.scope]


@dataclass(frozen=True, slots=True)
class Fetched:
    """A page fetched, parsed and validated ahead of being applied."""

    request: PageRequest
    following: PageRequest | None
    page: ValidatedPage
    records: int


#: validates the records of one page of a job (records.validate_page unless given)
Validate = Callable[[Sequence[object]], ValidatedPage]


class Ahead(Protocol):
    """Where `produce` hands pages on, in order: a page, an exception, or None at the end."""

    async def put(self, item: Fetched | BaseException | None) -> None: ...


def paginator_for(callback: CallbackConfig, start: Checkpoint) -> pagination.Paginator:
    return pagination.Paginator(mode=callback.pagination, page_size=callback.page_size,
                                max_pages=callback.max_pages, start=start)


class LocalFeed:
    """Fetching in a task of this event loop, beside the sweep that applies."""

    def __init__(self, job: Job, start: Checkpoint, source: PageSource) -> None:
        # At most prefetch + 1 pages are fetched and not yet applied (memory stays flat);
        # with prefetch 0 the next request waits until the page before is applied and
        # acknowledged.
        self._slots = asyncio.Semaphore(job.callback.effective_prefetch + 1)
        self._ahead: asyncio.Queue[Fetched | BaseException | None] = asyncio.Queue()
        self._producer = asyncio.create_task(produce(
            job, paginator_for(job.callback, start), source=source, ahead=self._ahead,
            slots=self._slots))

    async def next(self) -> Fetched | None:
        item = await self._ahead.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def applied(self) -> None:
        self._slots.release()

    def ready(self) -> bool:
        return not self._ahead.empty()

    async def aclose(self) -> None:
        self._producer.cancel()
        await asyncio.gather(self._producer, return_exceptions=True)


async def produce(
    job: Job, paginator: pagination.Paginator, *, source: PageSource, ahead: Ahead,
    slots: asyncio.Semaphore, validate: Validate | None = None,
) -> None:
    """Fetch pages in order into `ahead`, each holding a slot until it is applied.
    `validate`: how a page's records are validated (records.validate_page by default).

    One request at a time (parallel_pages 1): the next page is asked for as soon as this
    one says it exists, and this page is validated while the tenant answers (_ask). With
    --fetch-process, from a tenant that takes 5 ms a page, a pull of 20k customers took 8%
    less at page size 50 (4 interleaved rounds) and 17% less at 500 (5 rounds); from the
    bench's tenant, which answers at once, and without --fetch-process (where one core is
    the limit) no difference was measurable. A page is parsed here, just before it is
    validated, not in the task that fetched it (_body), and with other sweeps fetching in
    this event loop nothing of theirs runs in between (_ask): see _SEND_YIELDS.

    With parallel_pages > 1 (page mode), the next page numbers are asked for before the
    tenant has said they exist, up to that many requests in flight and within the free
    slots. Pages are still handed on in order; when the sweep ends (or goes otherwise
    than predicted) the requests asked beyond it are cancelled and their answers, errors
    included, dropped.

    Any error, not only a PullerError, is handed to `ahead`, whose consumer raises it: a
    producer that died silently would leave the consumer waiting for the next page
    forever.
    """
    width = job.callback.parallel_pages
    check = validate or _validate_page(job)
    window: _Window = collections.deque()
    asked: asyncio.Task[bytes] | None = None  # width 1: the next page's body, asked for (_ask)
    request: PageRequest | None = paginator.first()
    with _fetching():  # _ask's turns of the loop, for a sweep fetching alone
        try:
            while request is not None:
                if width == 1:
                    if asked is None:
                        await slots.acquire()
                        body = await _body(request, source)
                    else:
                        body, asked = await asked, None
                    with logs.bound(page=request.label):
                        envelope = _parsed(job, request, body)
                        following = _following(job, request, envelope, paginator)
                    asked = await _ask(job, following, source, slots)
                    with logs.bound(page=request.label):
                        page = check(envelope.data)
                    fetched = Fetched(request=request, following=following, page=page,
                                      records=len(envelope.data))
                else:
                    downloaded = await _next_in_window(job, request, paginator, source=source,
                                                       window=window, slots=slots, width=width,
                                                       validate=check)
                    fetched = _in_order(job, request, downloaded, paginator)
                await ahead.put(fetched)
                request = fetched.following
                if window and window[0][0] != request:
                    await _drop(window, slots)
            await ahead.put(None)
        except Exception as exc:  # handed to the consumer, which raises it (above)
            await ahead.put(exc)
        finally:
            if asked is not None:  # the sweep ended early (stopped, failed): its answer is dropped
                await _dropped([asked], slots)
            await _drop(window, slots)


async def _ask(job: Job, request: PageRequest | None, source: PageSource,
               slots: asyncio.Semaphore) -> asyncio.Task[bytes] | None:
    """With one request at a time: ask for the next page as soon as the tenant has said it
    exists, before this page is validated, so that validating this page and the tenant
    answering the next one overlap. Only within a free slot (never with prefetch 0, as with
    a commit_url: then the next request waits for this page's acknowledgement)."""
    if request is None or slots.locked():
        return None
    await slots.acquire()  # free: at once
    task = asyncio.create_task(_body(request, source))
    try:
        for _ in range(_SEND_YIELDS if _fetching_alone() else 0):
            await asyncio.sleep(0)  # the request is sent before validation holds the loop
    except asyncio.CancelledError:
        await _dropped([task], slots)
        raise
    return task


_SEND_YIELDS = 3
"""Turns of the event loop that a request takes to reach the socket: httpx over aiohttp
writes it in the second (on a kept-alive connection; measured on asyncio and uvloop); one
more to spare. A turn costs microseconds. Fewer only delays the request, which then
overlaps less (tests/integration/test_pull.py says so if it comes to that).

Only for a sweep fetching alone in its event loop. With other sweeps fetching there, these
turns ran their pages (parsed as they came, validated: a few ms each at page size 500)
between this page's parsing and its validation, and its records were no longer in the
CPU's caches: with 8 sweeps at once the fetch process validated a page of 500 customers in
0.92-1.05 ms against 0.57-0.70 ms alone (medians of 400 pages). Without the turns, and each
page parsed just before it is validated (_body), a pull of 100 tenants x 2,000 customers at
page size 500 into SQLite with --fetch-process took 6-11% less (3 sets of 5-6 interleaved
rounds: 1.47 against 1.57 s, 1.67 against 1.87, 1.77 against 1.92), the fetch process's
CPU 12-16% less (2026-11-28); at page size 50, and on PostgreSQL, within the noise. Other
sweeps' pages fill the loop's time while the tenant answers. Apart, each did less: parsing
just before validating with the turns kept, nothing (1.70 against 1.67 s); the turns
dropped with pages parsed as they came, half (1.75 against 1.87 s)."""


_FETCHING: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = (
    weakref.WeakKeyDictionary())
"""How many sweeps are fetching (produce) in each event loop."""


@contextlib.contextmanager
def _fetching() -> Iterator[None]:
    """A sweep fetching in this event loop (_fetching_alone), for as long as it lasts."""
    loop = asyncio.get_running_loop()
    _FETCHING[loop] = _FETCHING.get(loop, 0) + 1
    try:
        yield
    finally:
        _FETCHING[loop] -= 1


def _fetching_alone() -> bool:
    """Whether no other sweep is fetching in this event loop."""
    return _FETCHING.get(asyncio.get_running_loop(), 0) <= 1


async def _next_in_window(
    job: Job, request: PageRequest, paginator: pagination.Paginator, *, source: PageSource,
    window: _Window, slots: asyncio.Semaphore, width: int, validate: Validate,
) -> _Downloaded:
    """`request`'s page, with up to `width` predicted requests in flight behind it."""
    if not window:
        await slots.acquire()
        window.append((request, _download_task(job, request, source, validate)))
    while len(window) < width and not slots.locked():
        guess = paginator.predict(window[-1][0])
        if guess is None:
            break
        await slots.acquire()  # free (not locked): returns at once
        window.append((guess, _download_task(job, guess, source, validate)))
    asked, task = window.popleft()
    assert asked == request, (asked, request)
    return await task


async def _drop(window: _Window, slots: asyncio.Semaphore) -> None:
    """Cancel requests asked ahead that are not needed; their answers are ignored."""
    await _dropped([task for _, task in window], slots)
    window.clear()


async def _dropped(tasks: Sequence[asyncio.Task[Any]], slots: asyncio.Semaphore) -> None:
    """Pages asked for ahead that the sweep no longer wants: cancelled, their answers
    (errors included) ignored, their slots freed."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for _ in tasks:
        slots.release()


@dataclass(frozen=True, slots=True)
class _Downloaded:
    envelope: Envelope
    page: ValidatedPage


_Window = collections.deque[tuple[PageRequest, asyncio.Task[_Downloaded]]]
"""With parallel_pages > 1: the requests in flight, in page order, each with its task."""


def _validate_page(job: Job) -> Validate:
    """records.validate_page for `job`'s pages: how a page is validated by default."""
    return functools.partial(records.validate_page, job.scope,
                             normalize_case=job.tenant.normalize_case)


def _download_task(job: Job, request: PageRequest, source: PageSource, validate: Validate
                   ) -> asyncio.Task[_Downloaded]:
    return asyncio.create_task(_download(job, request, source, validate))


async def _download(job: Job, request: PageRequest, source: PageSource,
                    validate: Validate) -> _Downloaded:
    """fetch → parse → validate: what can run ahead, out of order."""
    body = await _body(request, source)
    with logs.bound(page=request.label):
        envelope = _parsed(job, request, body)
        return _Downloaded(envelope, validate(envelope.data))


async def _body(request: PageRequest, source: PageSource) -> bytes:
    """fetch: a page's body, parsed just before it is validated (produce, _download)."""
    with logs.bound(page=request.label):
        return await source.fetch_page(request)


def _parsed(job: Job, request: PageRequest, body: bytes) -> Envelope:
    return protocol.parse_envelope(body, where=Where(job.tenant.id, job.scope, request.label))


def _in_order(job: Job, request: PageRequest, downloaded: _Downloaded,
              paginator: pagination.Paginator) -> Fetched:
    """The tenant's status, the meta check and the next request: in page order."""
    envelope = downloaded.envelope
    with logs.bound(page=request.label):
        following = _following(job, request, envelope, paginator)
    return Fetched(request=request, following=following, page=downloaded.page,
                   records=len(envelope.data))


def _following(job: Job, request: PageRequest, envelope: Envelope,
               paginator: pagination.Paginator) -> PageRequest | None:
    """The tenant's status, the meta check and the next request, if any."""
    where = Where(job.tenant.id, job.scope, request.label)
    if envelope.status is not None and envelope.status != protocol.SUCCESS:
        raise errors.TenantReportedError(
            tenant=where.tenant, scope=where.scope.value, page=where.page,
            status=envelope.status, message=envelope.message,
        )
    mismatch = pagination.meta_mismatch(request, envelope.meta)
    if mismatch:
        logs.get_logger().warning("page_meta_mismatch", detail=mismatch)
    return paginator.advance(request, envelope.meta, where=where)
