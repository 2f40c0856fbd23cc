"""The Alembic adapter: which schema revision a database has, and upgrading it.

Alembic is imported only to upgrade: checking the revision at start-up is one SELECT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection, inspect, text

SCRIPTS = Path(__file__).parent / "migrations"
HEAD = "0002"
"""The revision this code needs; a test checks it is the newest script in migrations/."""


def head() -> str:
    """The revision this code needs."""
    return HEAD


def current(conn: Connection) -> str | None:
    """The database's revision; None for a database without one."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    value = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one_or_none()
    return None if value is None else str(value)


def is_empty(conn: Connection) -> bool:
    """True when the database has no puller table yet (a fresh store)."""
    return not inspect(conn).has_table("runs") and current(conn) is None


def upgrade(conn: Connection, revision: str = "head") -> None:
    """Upgrade to `revision` (default: head) inside the caller's transaction."""
    from alembic import command  # noqa: PLC0415 - lazy: only upgrades need Alembic

    command.upgrade(_config(conn), revision)


def script_head() -> str | None:
    """The newest revision among the migration scripts (tests compare it with HEAD)."""
    from alembic.script import ScriptDirectory  # noqa: PLC0415 - lazy, as above

    return ScriptDirectory.from_config(_config()).get_current_head()


def new_revision(conn: Connection, message: str) -> None:
    """Autogenerate a migration from the difference between schema.py and `conn` (dev)."""
    from alembic import command  # noqa: PLC0415 - lazy: only upgrades need Alembic

    command.revision(_config(conn), message=message, autogenerate=True)


def _config(conn: Connection | None = None) -> Any:
    from alembic.config import Config  # noqa: PLC0415 - lazy, as above

    config = Config()
    config.set_main_option("script_location", str(SCRIPTS))
    config.attributes["connection"] = conn
    return config
