"""Fetching in a process of its own: `puller pull --fetch-process` and `puller run
--fetch-process` (issue #5).

One puller process is bound by one core: fetching, parsing and validating a page hold
Python's GIL as much as applying it does. With `--fetch-process`, a second process fetches,
parses and validates every sweep's pages, in order, and the main process only applies
them (one transaction per page, in order, the checkpoint with the page) and acknowledges
them. The two run on two cores: in scripts/bench, one tenant, 1.22-1.84x at page size 50
and 1.01-1.32x at 500 (the least with a PostgreSQL on the same two cores), where the
fetch process is the busier of the two on SQLite and PostgreSQL is the limit at page
size 500 (README "Performance").

The fetch process is forked before the event loop starts, when the main process has no
thread, event loop or open store connection, and before the main process imports SQLAlchemy
and opens the store: it imports and sets up its HTTP clients meanwhile, and never imports
SQLAlchemy (the records' store forms are built by forms.py, which needs none). It serves
every sweep of the pull over two pipes: the main process asks for a sweep from its
checkpoint and returns a credit for each page it applied (so at most `prefetch + 1` pages of
a sweep are fetched and not yet applied: memory stays flat), and the fetch process sends
each page as it was validated, its records already in the store's form (domain.StoreRows:
rows of plain values pickle and unpickle in 0.1 ms each for a page of 500 customers, the
record objects took 0.7 and 0.3 ms, and building the rows 0.7 ms moves off the main process,
which is the busier of the two; a clean customer page is built into that form straight
from validation, fetch_serve._Out.validate). A reader thread hands each page to its sweep:
without a commit_url to an applier thread, which applies its sweeps' pages in the order they arrive
(pipeline.PushFeed; one applier thread for every sweep on SQLite, which takes one writer at
a time, on PostgreSQL one per concurrent sweep up to one more than the cores, each sweep's
pages on one of them: pulls.appliers), else to the event loop. Acknowledgements (`commit_url`) stay
with the main process: they follow the page's commit. Without a commit_url (or a tenant's
ca_bundle to check) the main process makes no request and imports no HTTP client: the
fetch process imports it after the fork.

Failures are the sweep's, as without the option: a tenant's error, a broken page or a
refused address fails that run with the same message. If the fetch process dies, every
sweep it served fails with a message that says so; the next run resumes at the
checkpoint. It ends when the main process closes its pipe, however the main process ends
(SIGKILL included), and it ignores the terminal's Ctrl-C, which the main process handles
(a worker's, SIGTERM too: the worker drains its runs, then closes the pipe).

For the worker, each sweep's job and retry policy come with its start (a reloaded config
reaches the fetch process), and its failed and retried requests are told back for the
worker's metrics (fetch_serve._Relay). A worker replaces a fetch process that died with
one started as a new interpreter (`FetchProcess.spawn`, worker.Worker._fetching): forking
again from a process with threads is unsafe.
POSIX only (os.fork). This module is the main process's end; fetch_serve, the fetch
process's.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

from puller import errors, fetch_serve, logs, pipeline
from puller.config import PullerConfig, RetryConfig
from puller.domain import Checkpoint

if TYPE_CHECKING:
    from puller import client

_STOP_WAIT_S = 5.0
_PIPE_BYTES = 1 << 20  # Linux's default pipe-max-size


class FetchProcess:
    """The main process's end of the fetch process; `feed` is a pipeline.FeedFactory."""

    def __init__(self, pid: int, control: int, pages: int, appliers: int = 1) -> None:
        self._pid = pid
        self._control = control
        self._pages: IO[bytes] = os.fdopen(pages, "rb", buffering=1 << 20)
        self._feeds: dict[int, _RemoteFeed] = {}
        self._keys = 0
        self._reader: threading.Thread | None = None
        # Each applier thread's pushed items, in the order they came (a sweep's always go
        # to the same thread); None ends it.
        self._pushed: list[queue.SimpleQueue[tuple[_RemoteFeed, tuple[str, Any]] | None]] = [
            queue.SimpleQueue() for _ in range(max(1, appliers))]
        self._appliers: list[threading.Thread] = []
        self._ended: str | None = None
        self._ending = threading.Lock()  # the reader, the loop and a store thread may all end it
        self._status: int | None = None  # its wait status, once reaped
        self._reaping = threading.Lock()  # the reader thread and the loop may both ask
        self._stopped = False

    @classmethod
    def start(cls, jobs: Sequence[pipeline.Job], config: PullerConfig, *,
              dialect: str, appliers: int = 1,
              worker: bool = False) -> FetchProcess:
        """Fork the fetch process; call before any thread or event loop. `jobs`: the ones
        known now, whose HTTP clients it sets up at once (each sweep's job and retry policy
        come with the sweep's start, so a worker's reloaded config reaches it).
        `dialect`: the store's, whose form the records are sent in (StoreRows).
        `appliers`: the threads that apply pushed sweeps' pages, each sweep's on one of
        them: 1 for a store that takes one writer at a time (SQLite). `worker`: it serves
        a long-lived worker, which ends it by closing the pipe after draining its runs, so
        it ignores SIGTERM too (a service manager signals every process of the service)."""
        sys.stdout.flush()
        sys.stderr.flush()
        control_read, control_write = os.pipe()
        pages_read, pages_write = os.pipe()
        _widen(pages_write)
        pid = os.fork()
        if pid == 0:  # the fetch process: never returns
            os.close(control_write)
            os.close(pages_read)
            fetch_serve.serve(jobs, config, control_read, pages_write, dialect=dialect,
                   ignore_sigterm=worker)
        os.close(control_read)
        os.close(pages_write)
        logs.get_logger().info("fetch_process_started", pid=pid)
        return cls(pid, control_write, pages_read, appliers)

    @classmethod
    def spawn(cls, config: PullerConfig, *, dialect: str, appliers: int = 1) -> FetchProcess:
        """A fetch process for a worker, started as a new interpreter rather than forked:
        for a process that has threads already (a worker replacing one that died). It
        serves as one started with `worker=True`; its settings come as its first message."""
        control_read, control_write = os.pipe()
        pages_read, pages_write = os.pipe()
        _widen(pages_write)
        for fd in (control_read, pages_write):
            os.set_inheritable(fd, True)
        try:
            pid = os.posix_spawn(sys.executable, [
                sys.executable, "-c", "from puller import fetch_serve; "
                f"fetch_serve.serve_spawned({control_read}, {pages_write})"], os.environ)
        finally:
            os.close(control_read)
            os.close(pages_write)
        fetch_serve.send(control_write, ("setup", config, dialect, logs.settings()))
        logs.get_logger().info("fetch_process_started", pid=pid, spawned=True)
        return cls(pid, control_write, pages_read, appliers)

    @property
    def ended(self) -> str | None:
        """Why the fetch process is gone (what its sweeps were told), or None while it runs;
        one that exited is found so even before any sweep was asked of it."""
        if self._ended is None and not self._stopped and self._reap(0) is not None:
            self._end(self._gone())
        return self._ended

    def feed(self, job: pipeline.Job, start: Checkpoint, run_id: int, *,
             retry: RetryConfig | None = None,
             observer: client.RequestObserver | None = None) -> pipeline.PageFeed:
        """A sweep of `job` from `start`, asked of the fetch process at once, or, for a
        sweep applied as its pages come (pipeline.applied_in_thread), when it is pushed to
        (`push_to`): its pages go to an applier thread, which applies its sweeps' pages in
        the order they arrive; any other sweep's go through the event loop."""
        if self._reader is None:
            self._reader = threading.Thread(target=self._read, name="puller-fetch-reader",
                                            daemon=True)
            self._reader.start()
            self._appliers = [
                threading.Thread(target=self._apply, args=(pushed,), daemon=True,
                                 name=f"puller-applier-{number}")
                for number, pushed in enumerate(self._pushed, 1)]
            for applier in self._appliers:
                applier.start()
        self._keys += 1
        loop = None if pipeline.applied_in_thread(job) else asyncio.get_running_loop()
        feed = self._feeds[self._keys] = _RemoteFeed(
            self, self._keys, loop, ("start", self._keys, job, retry, start, run_id),
            observer=observer)
        if self._ended is not None:  # a sweep asked for after the fetch process died
            feed.deliver(("error", self._ended))
        elif loop is not None:
            feed.begin()
        return feed

    def tell(self, message: tuple[Any, ...]) -> None:
        """Send a message to the fetch process; if it is gone, its sweeps fail. From any
        thread: a message is far below PIPE_BUF, so each is written whole."""
        if self._ended is not None or self._stopped:
            return  # each open sweep was told why, once; or the pull is over
        try:
            fetch_serve.send(self._control, message)
        except OSError:  # EPIPE: it died; the reader says how
            self._end(self._gone())

    def forget(self, key: int) -> None:
        """The sweep `key` ended: the fetch process drops whatever it fetched ahead."""
        if self._feeds.pop(key, None) is not None and self._ended is None:
            self.tell(("stop", key))

    def stop(self) -> None:
        """Tell the fetch process to end: it exits when its pipe closes. Once its sweeps are
        done, before the store closes, so that it ends meanwhile (close reaps it)."""
        if not self._stopped:
            self._stopped = True
            os.close(self._control)

    def close(self) -> None:
        """End the fetch process and reap it."""
        self.stop()
        if self._reader is not None:
            self._reader.join(_STOP_WAIT_S)
        for pushed in self._pushed:
            pushed.put(None)
        for applier in self._appliers:
            applier.join(_STOP_WAIT_S)
        if self._reap(_STOP_WAIT_S) is None:
            os.kill(self._pid, signal.SIGKILL)
            os.waitpid(self._pid, 0)
        self._pages.close()

    def _reap(self, timeout_s: float) -> int | None:
        with self._reaping:
            if self._status is None:
                self._status = _wait(self._pid, timeout_s)
            return self._status

    def _read(self) -> None:
        """The reader thread: hand each page to its sweep's feed."""
        while (message := _receive(self._pages)) is not None:
            key, kind, payload = message
            feed = self._feeds.get(key)
            if feed is None:  # the sweep ended and dropped what was fetched ahead
                continue
            if kind in fetch_serve.OBSERVED:
                feed.observe(kind, payload)
            else:
                feed.deliver((kind, payload))
        self._end(self._gone())

    def push(self, feed: _RemoteFeed, item: tuple[str, Any]) -> None:
        """Hand an item of a pushed sweep to the applier thread; from any thread."""
        self._pushed[feed.key % len(self._pushed)].put((feed, item))

    @staticmethod
    def _apply(pushed: queue.SimpleQueue[tuple[_RemoteFeed, tuple[str, Any]] | None]) -> None:
        """An applier thread: its pushed sweeps' items, in the order they came."""
        while (entry := pushed.get()) is not None:
            feed, item = entry
            try:
                feed.step(item)
            except Exception:  # pragma: no cover - a defect: the step hands on its own errors
                logs.get_logger().exception("applier_crashed")

    def _gone(self) -> str:
        status = self._reap(0.5)
        how = "" if status is None else f" with exit code {os.waitstatus_to_exitcode(status)}"
        return (f"the fetch process (pid {self._pid}) ended{how} while this run was "
                "fetching; its output is above; the next run resumes at the checkpoint "
                "(pull without --fetch-process if this repeats)")

    def _end(self, reason: str) -> None:
        with self._ending:
            if self._ended is not None:  # a failed send and the end of the pipe both say so
                return
            self._ended = reason
            feeds = list(self._feeds.values())
        for feed in feeds:
            feed.deliver(("error", reason))


class _RemoteFeed:
    """A sweep's pages from the fetch process: pushed to the sweep on the applier thread
    (`push_to`), or, when `loop` is given, awaited on that event loop (`next`)."""

    def __init__(self, owner: FetchProcess, key: int,
                 loop: asyncio.AbstractEventLoop | None, start: tuple[Any, ...], *,
                 observer: client.RequestObserver | None = None) -> None:
        self._owner = owner
        self._observer = observer
        self.key = key
        self._loop = loop
        self._start = start
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._step: pipeline.Step | None = None
        self._early: list[tuple[str, Any]] = []  # pushed before push_to: an error at most
        self._lock = threading.Lock()

    def begin(self) -> None:
        """Ask the fetch process for the sweep."""
        self._owner.tell(self._start)

    def deliver(self, item: tuple[str, Any]) -> None:
        """A page, the end or an error for this sweep; from any thread."""
        if self._loop is None:
            with self._lock:
                if self._step is None:
                    self._early.append(item)
                    return
            self._owner.push(self, item)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the pull is over
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def observe(self, kind: str, status: str | None) -> None:
        """A failed or retried request of this sweep, as the fetch process saw it; on the
        reader thread (the observer's metrics take any thread)."""
        if self._observer is None:
            return
        if kind == "failed":
            self._observer.request_failed(status or "")
        else:
            self._observer.request_retried()

    def push_to(self, step: pipeline.Step) -> None:
        with self._lock:
            self._step = step
            early, self._early = self._early, []
        for item in early:
            self._owner.push(self, item)
        if not early:
            self.begin()

    def step(self, item: tuple[str, Any]) -> None:
        """On the applier thread: hand the item to the sweep."""
        assert self._step is not None  # only pushed once push_to was called
        self._step(functools.partial(_unpack, item))

    async def next(self) -> pipeline.Fetched | None:
        if self._loop is None:  # pragma: no cover - a defect: such a sweep is pushed to
            raise AssertionError("next() on a sweep that is pushed to")
        return _unpack(await self._queue.get())

    def applied(self) -> None:
        self._owner.tell(("credit", self.key))

    def ready(self) -> bool:
        return self._loop is not None and not self._queue.empty()

    async def aclose(self) -> None:
        self._owner.forget(self.key)


def _unpack(item: tuple[str, Any]) -> pipeline.Fetched | None:
    kind, payload = item
    if kind == "page":
        fetched: pipeline.Fetched = payload
        return fetched
    if kind == "end":
        return None
    raise errors.FetchProcessError(payload)


def _widen(pipe: int) -> None:
    """A pipe that holds a page of 500 customers (~140 KB) whole, where the system allows
    (Linux): with the default 64 KiB the fetch process waited in os.write for the main
    process's reader at every such page. 3-4% of a pull at page size 500 in scripts/bench
    (5 interleaved rounds, PostgreSQL and SQLite)."""
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep the default
            fcntl.fcntl(pipe, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)


def _receive(stream: IO[bytes]) -> Any:
    """The next message, or None at the end of the pipe."""
    head = stream.read(fetch_serve.HEAD.size)
    if len(head) < fetch_serve.HEAD.size:
        return None
    body = stream.read(fetch_serve.HEAD.unpack(head)[0])
    return pickle.loads(body)  # noqa: S301 - written by this process's own fork


def _wait(pid: int, timeout_s: float) -> int | None:
    """The wait status of `pid` once it exited within `timeout_s`; None if it still runs.
    Polled at 0.5 ms, then less often: a fetch process told to end exits within ~2 ms, and
    a first pause of 10 ms was 1% of a pull of 100k at page size 500."""
    end = time.monotonic() + timeout_s
    pause_s = 0.0005
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= end:
            return None
        time.sleep(pause_s)
        pause_s = min(2 * pause_s, 0.01)
