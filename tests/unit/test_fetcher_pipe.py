"""The pipe that carries pages from the fetch process holds a page of 500 customers whole."""

from __future__ import annotations

import fcntl
import os
import sys

import pytest

from puller import fetcher


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
