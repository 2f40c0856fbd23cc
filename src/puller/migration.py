"""The Alembic adapter: which schema revision a database has, and upgrading it.

Alembic is imported only to upgrade: checking the revision at start-up is one SELECT, and
a fresh database is created at head from schema.py (create_head).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    inspect,
    text,
)

from puller import schema
from puller.sqlite_schema import SCHEMA_HEAD

SCRIPTS = Path(__file__).parent / "migrations"
HEAD = SCHEMA_HEAD
"""The revision this code needs (sqlite_schema.SCHEMA_HEAD, where the pull on SQLite reads
it without SQLAlchemy); a test checks it is the newest script in migrations/."""


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


_VERSION = Table(  # Alembic's own table, as Alembic creates it
    "alembic_version", MetaData(), Column("version_num", String(32), nullable=False),
    PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
)


def create_head(conn: Connection) -> None:
    """Create a fresh database's schema at head, inside the caller's transaction: schema.py's
    tables, then the revision, which is Alembic's recipe for a database built from scratch
    ("create_all, then stamp head") without importing Alembic. Running the three scripts
    cost a first pull 0.13 s on SQLite and 0.2 s on PostgreSQL (issue #5); a test checks
    that the scripts build the same schema."""
    schema.metadata.create_all(conn)
    _VERSION.create(conn)
    conn.execute(_VERSION.insert().values(version_num=HEAD))


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
