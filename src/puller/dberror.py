"""Database errors turned into what an operator reads: the first line and what to do."""

from __future__ import annotations

BUSY_TIMEOUT_ENV = "PULLER_SQLITE_BUSY_TIMEOUT_MS"
"""How long a SQLite write waits for another process's lock before failing (default 10 s)."""


def first_line(exc: Exception) -> str:
    """The driver's own message, first line only (no SQL, no parameters); `exc` is a
    SQLAlchemy error or the driver's own."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig)
    return text.strip().splitlines()[0][:300] if text.strip() else "no detail"


_LOCKED = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED"})
_FULL_SQLITE = "SQLITE_FULL"
_FULL_SQLSTATE = "53100"  # PostgreSQL disk_full


def hint(exc: Exception) -> str:
    """What to do about it, decided by the driver's error code, not its wording."""
    orig = getattr(exc, "orig", None) or exc
    code = getattr(orig, "sqlite_errorname", None)
    if code in _LOCKED:
        return (f"another process held a write lock on the SQLite file longer than "
                f"{BUSY_TIMEOUT_ENV} allows; find it (fuser FILE), or use PostgreSQL")
    if code == _FULL_SQLITE or getattr(orig, "sqlstate", None) == _FULL_SQLSTATE:
        return ("the disk is full; free space and run again — the run resumes at the last "
                "stored page")
    return "check that the database is reachable and writable, then run again"
