"""The fetch process's side of `--fetch-process` (fetcher, whose docstring tells the
whole): it serves the main process's sweeps, fetching, parsing and validating each page and
sending it in the store's form, until the main process closes its pipe. The two talk over
two pipes in messages of a length (HEAD) and a pickle (send). fetcher.FetchProcess, the
main process's end, starts it: forked (serve), or as a new interpreter (serve_spawned).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import pickle
import signal
import struct
import sys
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from puller import errors, forms, logs, pipeline, prefetch, records
from puller.config import PullerConfig, RetryConfig
from puller.domain import Checkpoint, Scope, ValidatedPage

if TYPE_CHECKING:
    from puller import client

HEAD = struct.Struct("<I")  # each message: its length, then the pickle


def serve_spawned(control: int, pages: int) -> None:
    """The entry of a fetch process started by `FetchProcess.spawn`: its settings, then
    sweeps as a forked one serves them (never returns)."""
    head = _read_exactly(control, HEAD.size)
    kind, config, dialect, log_settings = pickle.loads(  # noqa: S301 - from its parent
        _read_exactly(control, HEAD.unpack(head)[0]))
    assert kind == "setup"
    logs.configure(**log_settings)
    serve([], config, control, pages, dialect=dialect, ignore_sigterm=True)


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            os._exit(0)  # the parent went away before it said anything
        data += chunk
    return data


def serve(jobs: Sequence[pipeline.Job], config: PullerConfig, control: int, pages: int,
           *, dialect: str, ignore_sigterm: bool = False) -> None:
    # Own process group and no Ctrl-C: the main process handles signals and ends this
    # process by closing the pipe, after recording its runs as interrupted.
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_sigterm else signal.SIG_DFL)
    code = 0
    try:
        # Imported here, not before the fork: the main process needs no HTTP client unless
        # it acknowledges pages (pulls.pull_now). Frozen as the main process froze its own.
        from puller import client  # noqa: F401, PLC0415

        gc.freeze()
        pipeline.run_event_loop(_fetch_sweeps(jobs, config, control, pages, dialect=dialect))
    except BaseException:  # whatever happens, the process must reach os._exit
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


async def _fetch_sweeps(jobs: Sequence[pipeline.Job], config: PullerConfig,
                        control: int, pages: int, *, dialect: str) -> None:
    """Serve sweeps until the main process closes the control pipe."""
    from puller import client  # noqa: PLC0415 - imported by serve
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    _read_on(loop, control, inbox)
    sweeps: dict[int, tuple[asyncio.Task[None], asyncio.Semaphore]] = {}
    async with client.HttpClients(allow_private_networks=config.allow_private_networks) as http:
        for job in jobs:  # while the main process opens the store
            with contextlib.suppress(errors.ConfigError):  # the main process reports it
                http.for_tenant(job.tenant)
        while (message := await inbox.get()) is not None:
            kind, key, *rest = message
            if kind == "credit" and key in sweeps:
                sweeps[key][1].release()
            elif kind == "stop" and key in sweeps:
                sweeps.pop(key)[0].cancel()
            elif kind == "start":
                job, retry, start, run_id = rest
                slots = asyncio.Semaphore(job.callback.effective_prefetch + 1)
                task = asyncio.create_task(_sweep(
                    job, start, run_id, http=http, retry=retry or config.retry, slots=slots,
                    out=_Out(pages, key, job=job, dialect=dialect)))
                sweeps[key] = (task, slots)
        for task, _ in sweeps.values():
            task.cancel()
        await asyncio.gather(*(task for task, _ in sweeps.values()), return_exceptions=True)


async def _sweep(job: pipeline.Job, start: Checkpoint, run_id: int, *,
                 http: client.HttpClients, retry: RetryConfig, slots: asyncio.Semaphore,
                 out: _Out) -> None:
    from puller import client  # noqa: PLC0415 - imported by serve

    with logs.bound(tenant=job.tenant.id, scope=job.scope.value, run_id=run_id):
        try:
            source = client.CallbackSource(
                http.for_tenant(job.tenant), tenant=job.tenant, scope=job.scope,
                callback=job.callback, policy=retry, observer=_Relay(out))
        except Exception as exc:  # the main process would wait for this sweep forever
            await out.put(exc)
            return
        await prefetch.produce(job, prefetch.paginator_for(job.callback, start),
                               source=source, ahead=out, slots=slots, validate=out.validate)


class _Out:
    """prefetch.Ahead for one sweep: its pages, error or end, sent to the main process;
    a page's records in the store's form (StoreRows), which the main process applies as
    they come."""

    def __init__(self, pages: int, key: int, *, job: pipeline.Job, dialect: str) -> None:
        self._pages = pages
        self._key = key
        self._job = job
        self._dialect = dialect

    async def put(self, item: pipeline.Fetched | BaseException | None) -> None:
        if item is None:
            send(self._pages, (self._key, "end", None))
        elif isinstance(item, errors.PullerError):
            send(self._pages, (self._key, "error", str(item)))
        elif isinstance(item, BaseException):
            # A defect: the traceback is logged here, the run fails with what to do.
            logs.get_logger().error("fetch_crashed", exc_info=item)
            send(self._pages, (self._key, "error", pipeline.internal_error(item)))
        else:
            send(self._pages, (self._key, "page", self._in_store_form(item)))

    def observed(self, kind: str, status: str | None) -> None:
        """A failed or retried request, for the main process's metrics (_Relay)."""
        send(self._pages, (self._key, kind, status))

    def validate(self, raws: Sequence[object]) -> ValidatedPage:
        """prefetch.Validate: a page that the fast path accepts whole goes straight to the
        store's form: customers by forms.customer_rows (0.6 ms less a page of 500 on
        SQLite, 0.3 ms on PostgreSQL), orders and products by forms.payload_rows; any other
        page is validated as without the fetch process, and put in the store's form when
        it is sent."""
        scope, normalize = self._job.scope, self._job.tenant.normalize_case
        valid: records.ValidCustomers | records.ValidPayloads | None
        if scope is Scope.CUSTOMER:
            valid = records.valid_customers(raws, normalize_case=normalize)
            rows = None if valid is None else forms.customer_rows(valid, self._dialect)
        else:
            valid = records.valid_payloads(scope, raws, normalize_case=normalize)
            rows = None if valid is None else forms.payload_rows(scope, valid, self._dialect)
        if valid is not None and rows is not None:
            return ValidatedPage(accepted=[], rejections=[], normalised=valid.normalised,
                                 rows=rows)
        return records.validate_page(scope, raws, normalize_case=normalize)

    def _in_store_form(self, item: pipeline.Fetched) -> pipeline.Fetched:
        page = item.page
        if page.rows is not None:  # made so by validate
            return item
        rows = forms.prepare(page.accepted, self._job.scope, self._dialect)
        return dataclasses.replace(item, page=ValidatedPage(
            accepted=[], rejections=page.rejections, normalised=page.normalised, rows=rows))


OBSERVED = ("failed", "retried")
"""The kinds of message that report a sweep's request to the main process (_Relay)."""


class _Relay:
    """client.RequestObserver in the fetch process: each failed or retried request is told
    to the main process, whose observer (a worker's metrics) counts it."""

    def __init__(self, out: _Out) -> None:
        self._out = out

    def request_failed(self, status: str) -> None:
        self._out.observed("failed", status)

    def request_retried(self) -> None:
        self._out.observed("retried", None)


def _read_on(loop: asyncio.AbstractEventLoop, control: int, inbox: asyncio.Queue[Any]) -> None:
    """The main process's messages (starts, credits, stops) read by the event loop itself
    as they come, into `inbox`; None at the end of the pipe. Small and frequent (a credit
    a page): a reader thread cost a GIL hand-off and a wake-up of the loop for each, and
    the credit came late while the loop validated a page."""
    pending = bytearray()

    def readable() -> None:
        chunk = os.read(control, 65536)
        if not chunk:
            loop.remove_reader(control)
            inbox.put_nowait(None)
            return
        pending.extend(chunk)
        while len(pending) >= HEAD.size:
            size = HEAD.unpack_from(pending)[0]
            if len(pending) < HEAD.size + size:
                break
            body = bytes(pending[HEAD.size:HEAD.size + size])
            del pending[:HEAD.size + size]
            inbox.put_nowait(pickle.loads(body))  # noqa: S301 - from this process's parent

    loop.add_reader(control, readable)


def send(fd: int, message: object) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(HEAD.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]
