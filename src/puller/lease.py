"""Run leases: one process at a time per (tenant, scope), and one worker per SQLite file.

PostgreSQL: a session advisory lock on a connection of its own. SQLite: an flock on a file
beside the database. Both die with the process, so a crashed worker never blocks anyone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from puller import dberror, errors
from puller.domain import Scope

LEASE_CLASS = 0x70756C6C  # "pull": the first key of puller's PostgreSQL advisory locks


def worker_id() -> str:
    """host:pid of this process, asked each time: a forked `pull --processes` child has
    its own pid."""
    return f"{socket.gethostname()}:{os.getpid()}"[:100]


class Leases:
    """The leases of one store."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name
        self._held: dict[tuple[str, str], Connection] = {}
        self._worker_lock: TextIO | None = None

    @contextmanager
    def hold(self, tenant: str, scope: Scope) -> Iterator[bool]:
        """Hold the (tenant, scope) lease for a run, if free; yields whether it is held."""
        if self._dialect == "postgresql":
            with self._pg_lease(_lease_key(tenant, scope), (tenant, scope.value)) as held:
                yield held
            return
        with self._file_lock(f"{tenant}.{scope.value}.lock") as held:
            yield held

    @contextmanager
    def _pg_lease(self, key: int, name: tuple[str, str]) -> Iterator[bool]:
        try:
            conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            held = bool(conn.execute(select(func.pg_try_advisory_lock(LEASE_CLASS, key)))
                        .scalar_one())
        except SQLAlchemyError as exc:
            raise errors.StoreError(f"cannot take a lease: {dberror.first_line(exc)} — "
                                    f"{dberror.hint(exc)}") from exc
        if held:
            self._held[name] = conn
        try:
            yield held
        finally:
            self._held.pop(name, None)
            with contextlib.suppress(SQLAlchemyError):
                # On a dead connection the lock is already gone with it.
                conn.execute(select(func.pg_advisory_unlock(LEASE_CLASS, key)))
            with contextlib.suppress(SQLAlchemyError):
                conn.close()

    def connection(self, tenant: str, scope: Scope) -> Connection | None:
        """The autocommit connection holding this process's PostgreSQL lease, if any."""
        return self._held.get((tenant, scope.value))

    @contextmanager
    def _file_lock(self, name: str) -> Iterator[bool]:
        folder = self._lock_folder()
        if folder is None:
            yield True
            return
        with open(folder / name, "a+", encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _lock_folder(self) -> Path | None:
        database = self._engine.url.database
        if self._dialect != "sqlite" or not database or database == ":memory:":
            return None
        folder = Path(f"{database}-locks")
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def claim_single_worker(self) -> None:
        """Refuse a second worker process on the same SQLite file (held until exit)."""
        folder = self._lock_folder()
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


def _lease_key(tenant: str, scope: Scope) -> int:
    # pg advisory locks take two int4 keys; crc32 folded to a signed int. A collision only
    # makes two (tenant, scope) pairs take turns, never run at once.
    value = zlib.crc32(f"{tenant}\x00{scope.value}".encode())
    return value - 2**32 if value >= 2**31 else value
