"""Run leases: one process at a time per (tenant, scope), and one worker per SQLite file.

PostgreSQL: a session advisory lock on a connection of its own. SQLite: an flock on a file
beside the database (file_leases.FileLeases). Both die with the process, so a crashed
worker never blocks anyone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from puller import dberror, errors
from puller.domain import Scope
from puller.file_leases import FileLeases, worker_id
from puller.pg_store import LEASE_CLASS, lease_key

__all__ = ["LEASE_CLASS", "Leases", "worker_id"]


class Leases:
    """The leases of one store."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name
        self._held: dict[tuple[str, str], Connection] = {}
        self._files = FileLeases(engine.url.database if self._dialect == "sqlite" else None)

    @contextmanager
    def hold(self, tenant: str, scope: Scope) -> Iterator[bool]:
        """Hold the (tenant, scope) lease for a run, if free; yields whether it is held."""
        if self._dialect == "postgresql":
            with self._pg_lease(lease_key(tenant, scope), (tenant, scope.value)) as held:
                yield held
            return
        with self._files.hold(tenant, scope) as held:
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

    def claim_single_worker(self) -> None:
        """Refuse a second worker process on the same SQLite file (held until exit)."""
        self._files.claim_single_worker()


