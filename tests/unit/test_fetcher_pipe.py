"""The fetch process's pipes: the pages pipe holds a page of 500 customers whole; the
control pipe is read by the event loop, each message whole however the pipe splits it. And
how many applier threads take its pages (pulls.appliers)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pickle
import sys
from typing import Any

import pytest

from puller import fetch_serve, fetcher
from puller.domain import Checkpoint


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="F_SETPIPE_SZ is Linux's")
def test_the_pages_pipe_is_widened_to_a_mebibyte() -> None:
    read, write = os.pipe()
    try:
        before = fcntl.fcntl(write, fcntl.F_GETPIPE_SZ)
        fetcher._widen(write)
        assert before < fcntl.fcntl(write, fcntl.F_GETPIPE_SZ) == 1 << 20
    finally:
        os.close(read)
        os.close(write)


@pytest.mark.parametrize("piece", [1, 3, 1000], ids=["byte-by-byte", "3-bytes", "all-at-once"])
async def test_control_messages_are_read_whole_however_the_pipe_splits_them(piece: int) -> None:
    """The fetch process reads the main process's messages on its event loop: each message
    whole and in order, whether a read returns part of one or several; None at the end."""
    messages: list[Any] = [("start", 1, "t1", "customer", Checkpoint(next_number=2, next_page=2),
                            7), ("credit", 1), ("credit", 1), ("stop", 1)]
    data = b"".join(fetch_serve.HEAD.pack(len(body)) + body for body in
                    (pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL) for m in messages))
    read, write = os.pipe()
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    try:
        fetch_serve._read_on(asyncio.get_running_loop(), read, inbox)
        for start in range(0, len(data), piece):
            os.write(write, data[start:start + piece])
            for _ in range(3):
                await asyncio.sleep(0)
        os.close(write)
        got = [await asyncio.wait_for(inbox.get(), 5) for _ in range(len(messages) + 1)]
    finally:
        os.close(read)
    assert got == [*messages, None]


def test_appliers_one_on_sqlite_and_at_most_one_more_than_the_cores_on_postgresql(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from puller import pulls

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    assert [pulls.appliers("sqlite", n) for n in (1, 8)] == [1, 1]
    assert [pulls.appliers("postgresql", n) for n in (1, 2, 3, 8)] == [1, 2, 3, 3]
