"""Alembic's environment: migrates the connection that `cloud.db` or `python -m cloud.migrations` hands over.

No URL and no engine are made here: the caller owns the connection and its transaction (and, on PostgreSQL,
the advisory lock that keeps two coordinators from migrating at once).
"""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

from cloud import models  # noqa: F401  (registers the tables on SQLModel.metadata)
from cloud.migrations import render_item

connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError("run migrations through cloud.db.upgrade_db or `python -m cloud.migrations`, on a connection")

context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    # SQLite cannot ALTER most of a table: batch mode rebuilds it (copy, drop, rename) where needed.
    render_as_batch=True,
    compare_type=True,
    render_item=render_item,
)
with context.begin_transaction():
    context.run_migrations()
