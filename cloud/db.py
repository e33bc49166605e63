"""Database engine, schema migrations and sessions: built from settings by a factory, never at import time.

The schema is Alembic's (`cloud.migrations`): `upgrade_db` brings any database this code can read to its
head revision, adopting one made by release 0.1.0 (tables from `create_all`, no `alembic_version`) at the
baseline, and refuses one that a newer edgefleet has migrated past what this code knows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from alembic import command
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlmodel import Session, create_engine

from cloud import models  # noqa: F401  (registers the tables on SQLModel.metadata)
from cloud.errors import ConfigurationError
from cloud.migrations import BASELINE, BASELINE_TABLES, alembic_config, head_revision, known_revisions

if TYPE_CHECKING:
    import sqlite3

__all__ = [
    "SchemaStatus",
    "Upgrade",
    "create_db_engine",
    "init_db",
    "schema_status",
    "session_scope",
    "upgrade_db",
]

log = logging.getLogger(__name__)

# Key of the PostgreSQL advisory lock held while migrating: b"edgeflee" as a (positive) bigint.
_MIGRATION_LOCK_KEY = int.from_bytes(b"edgeflee", "big")


def create_db_engine(database_url: str) -> Engine:
    """An engine for `database_url` (SQLite or PostgreSQL); SQLite gets WAL and a busy timeout."""
    try:
        url = make_url(database_url)
    except Exception as exc:  # sqlalchemy raises ArgumentError with a terse message
        raise ConfigurationError(f"database_url {database_url!r} is not a valid SQLAlchemy URL: {exc}") from exc
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")  # psycopg 3 is the driver the cloud extra installs
    return create_engine(url, pool_pre_ping=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while the bridge writes; foreign keys are off by default in SQLite.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # WAL + NORMAL: a commit survives the coordinator being killed (SIGKILL) but not an OS crash or power cut,
    # which may lose the last commits (the database stays consistent). It spares an fsync per ingested message.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


@dataclass(frozen=True)
class Upgrade:
    """What `upgrade_db` did: the revision before (`None`: an empty database) and after.

    A database of release 0.1.0 is `adopted`: stamped at the baseline, which is then its `from_revision`.
    """

    from_revision: str | None
    to_revision: str
    adopted: bool = False  # a database of release 0.1.0, stamped at the baseline first

    @property
    def changed(self) -> bool:
        """True if the database's revision was written (migrated, or adopted at the baseline)."""
        return self.adopted or self.from_revision != self.to_revision


@dataclass(frozen=True)
class SchemaStatus:
    """Where a database's schema stands against this code: its revision, this code's head."""

    current: str | None  # None: an empty database, or one of release 0.1.0 (`unversioned`)
    head: str
    unversioned: bool = False  # edgefleet's tables without alembic_version: made by release 0.1.0

    @property
    def newer(self) -> bool:
        """True if a newer edgefleet migrated the database past what this code knows."""
        return self.current is not None and self.current not in known_revisions()


def schema_status(engine: Engine) -> SchemaStatus:
    """The database's revision (read only: nothing is created or stamped)."""
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
        unversioned = current is None and bool(BASELINE_TABLES & set(inspect(connection).get_table_names()))
    return SchemaStatus(current=current, head=head_revision(), unversioned=unversioned)


def upgrade_db(engine: Engine) -> Upgrade:
    """Migrate the database to this code's head revision; `ConfigurationError` if it is newer or unknown.

    The upgrade is one transaction that only one migrator holds at a time (PostgreSQL: an advisory lock;
    SQLite: the write lock), so a second coordinator starting at the same moment waits, then finds the
    database at head; a migration that fails leaves the database as it was.
    """
    head = head_revision()
    if schema_status(engine).current == head:  # the usual start: no lock, no write
        return Upgrade(from_revision=head, to_revision=head)
    with engine.connect() as connection, _migrating(connection):
        upgrade = _upgrade(connection)  # looks again under the lock: another process may have migrated
    if upgrade.changed:
        log.info(
            "database migrated from=%s to=%s adopted=%s",
            upgrade.from_revision or "empty",
            upgrade.to_revision,
            upgrade.adopted,
        )
    return upgrade


def init_db(engine: Engine) -> None:
    """Bring the schema to this code's revision (the app calls this at start): `upgrade_db`."""
    upgrade_db(engine)


def _upgrade(connection: Connection) -> Upgrade:
    """Adopt, check and upgrade inside the caller's transaction."""
    head = head_revision()
    current = MigrationContext.configure(connection).get_current_revision()
    adopted = False
    if current is None:
        present = BASELINE_TABLES & set(inspect(connection).get_table_names())
        if present == BASELINE_TABLES:  # made by release 0.1.0 with create_all: that is the baseline
            command.stamp(alembic_config(connection), BASELINE)
            current, adopted = BASELINE, True
        elif present:
            missing = ", ".join(sorted(BASELINE_TABLES - present))
            raise ConfigurationError(
                f"the database has some edgefleet tables but not all (missing: {missing}) and no alembic_version; "
                "it was not made by edgefleet 0.1.0 or later: restore a backup or start from an empty database"
            )
    elif current not in known_revisions():
        raise ConfigurationError(
            f"the database is at schema revision {current}, which this edgefleet does not know (its newest is "
            f"{head}): a newer edgefleet has upgraded it; run that version, or restore a backup taken before"
        )
    if current != head:
        command.upgrade(alembic_config(connection), "head")
    return Upgrade(from_revision=current, to_revision=head, adopted=adopted)


@contextmanager
def _migrating(connection: Connection) -> Iterator[None]:
    """One transaction around a migration, held by one migrator at a time."""
    if connection.dialect.name == "sqlite":
        with _sqlite_migrating(connection):
            yield
        return
    with connection.begin():
        if connection.dialect.name == "postgresql":
            # Released at commit or rollback; PostgreSQL's DDL is transactional, so this covers everything.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        yield


@contextmanager
def _sqlite_migrating(connection: Connection) -> Iterator[None]:
    """SQLite: foreign keys off (table rebuilds), then `BEGIN IMMEDIATE` so that DDL and DML commit as one.

    Python's sqlite3 module would begin a transaction only before the first DML, leaving earlier DDL
    committed on its own; with its implicit transactions off, the explicit BEGIN covers both. IMMEDIATE
    takes the write lock at once, so a second migrator waits (busy timeout) instead of racing.
    """
    dbapi = cast("sqlite3.Connection", connection.connection.dbapi_connection)
    saved = dbapi.isolation_level
    dbapi.isolation_level = None
    try:
        with connection.begin():
            # A batch migration rebuilds a table (copy, drop, rename); enforced foreign keys would make dropping
            # a referenced table fail or cascade. The pragma has no effect inside a transaction: set it first.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.exec_driver_sql("BEGIN IMMEDIATE")
            yield
            violations = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if violations:
                raise ConfigurationError(
                    f"a migration left {len(violations)} rows whose foreign keys point nowhere, e.g. {violations[:3]}"
                )
    finally:
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")
        connection.commit()
        dbapi.isolation_level = saved


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
