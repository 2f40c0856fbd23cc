"""Alembic environment: runs on the connection puller hands over (see puller.migration)."""

from __future__ import annotations

from alembic import context

from puller import schema

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=schema.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
