"""Helpers of the migration and backup tests: databases of release 0.1.0, scratch migrations, schema snapshots."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect
from sqlalchemy.engine import Engine, make_url

import cloud.migrations
from cloud.migrations import head_revision

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# The admin token tests/fixtures/build_release_0_1_0.py gave the coordinator that filled the fixtures.
RELEASE_TOKEN = "release-0.1.0-fixture-admin-token"


def libpq_url(database_url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as psycopg and the PostgreSQL tools take it."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


def load_release_0_1_0(database_url: str) -> None:
    """Fill the empty database at `database_url` with the committed database of release 0.1.0."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        assert url.database
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(FIXTURES / "release-0.1.0.sqlite", url.database)
        return
    import psycopg

    with psycopg.connect(libpq_url(database_url), autocommit=True) as connection:
        connection.execute((FIXTURES / "release-0.1.0.postgres.sql").read_text())  # type: ignore[arg-type]


def schema_of(engine: Engine, tables: set[str] | None = None) -> dict[str, Any]:
    """Tables, columns (type, nullability), indexes, unique and foreign keys, comparable across databases."""
    inspector = inspect(engine)
    names = sorted(set(inspector.get_table_names()) - {"alembic_version"})
    schema: dict[str, Any] = {}
    for table in names:
        if tables is not None and table not in tables:
            continue
        schema[table] = {
            "columns": [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)],
            "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
            "indexes": sorted((i["name"], tuple(i["column_names"]), i["unique"]) for i in inspector.get_indexes(table)),
            "unique": sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)),
            "foreign_keys": sorted(
                (tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]))
                for f in inspector.get_foreign_keys(table)
            ),
        }
    return schema


def scratch_migrations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, revision_body: str) -> str:
    """Run this test on a copy of the migrations plus one more revision (`9001`, on top of head); returns its id."""
    copy = tmp_path / "migrations"
    shutil.copytree(cloud.migrations.SCRIPT_LOCATION, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "versions" / "9001_scratch.py").write_text(
        f'"""A scratch revision of a test."""\n\nimport sqlalchemy as sa\nfrom alembic import op\n\n'
        f'revision = "9001"\ndown_revision = "{head_revision()}"\nbranch_labels = None\ndepends_on = None\n\n\n'
        f"def upgrade() -> None:\n{revision_body}\n"
    )
    monkeypatch.setattr(cloud.migrations, "SCRIPT_LOCATION", copy)
    return "9001"
