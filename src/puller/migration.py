"""The Alembic adapter: which schema revision a database has, and upgrading it."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect

SCRIPTS = Path(__file__).parent / "migrations"


def _config(conn: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(SCRIPTS))
    config.attributes["connection"] = conn
    return config


def head() -> str:
    """The revision this code needs."""
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert revision is not None
    return revision


def current(conn: Connection) -> str | None:
    """The database's revision; None for a database without puller tables."""
    return MigrationContext.configure(conn).get_current_revision()


def is_empty(conn: Connection) -> bool:
    """True when the database has no puller table yet (a fresh store)."""
    return not inspect(conn).has_table("runs") and current(conn) is None


def upgrade(conn: Connection, revision: str = "head") -> None:
    """Upgrade to `revision` (default: head) inside the caller's transaction."""
    command.upgrade(_config(conn), revision)


def new_revision(conn: Connection, message: str) -> None:
    """Autogenerate a migration from the difference between schema.py and `conn` (dev)."""
    command.revision(_config(conn), message=message, autogenerate=True)
