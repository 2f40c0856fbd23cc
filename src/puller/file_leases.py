"""SQLite's leases: an flock on a file beside the database, one per (tenant, scope), and one
for the worker that owns the store; and `worker_id`, the host:pid written in a run's row
and in the worker's lock file. Both SQLite stores take their leases here: sqlite_store's
(`pull`) and lease.Leases (store.Store, SQLAlchemy's)."""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from puller import errors
from puller.domain import Scope


def worker_id() -> str:
    """host:pid of this process, asked each time: a forked `pull --processes` child has
    its own pid."""
    return f"{socket.gethostname()}:{os.getpid()}"[:100]


class FileLeases:
    """SQLite's leases: an flock on a file beside the database (in PATH-locks/), which dies
    with the process, so a crashed worker never blocks anyone."""

    def __init__(self, database: str | None) -> None:
        self._folder = (None if not database or database == ":memory:"
                        else Path(f"{database}-locks"))
        self._worker_lock: TextIO | None = None

    @contextmanager
    def hold(self, tenant: str, scope: Scope) -> Iterator[bool]:
        """Hold the (tenant, scope) lease for a run, if free; yields whether it is held."""
        folder = self._made()
        if folder is None:
            yield True
            return
        with open(folder / f"{tenant}.{scope.value}.lock", "a+", encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def claim_single_worker(self) -> None:
        """Refuse a second worker process on the same SQLite file (held until exit)."""
        folder = self._made()
        if folder is None:
            return
        handle = open(folder / "worker.lock", "a+", encoding="utf-8")  # noqa: SIM115
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise errors.StoreBusyError(
                f"another puller worker ({owner}) is already running on this SQLite store; "
                "SQLite serves one worker — stop that one, or move the store to PostgreSQL "
                "to run several") from None
        handle.seek(0)
        handle.truncate()
        handle.write(worker_id())
        handle.flush()
        self._worker_lock = handle  # held (and the lock with it) until the process ends

    def _made(self) -> Path | None:
        if self._folder is not None:
            self._folder.mkdir(parents=True, exist_ok=True)
        return self._folder
