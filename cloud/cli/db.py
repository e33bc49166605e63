"""`edgefleet db upgrade|current`, `edgefleet backup` and `edgefleet restore`: the coordinator's database, offline.

They read the same settings as `edgefleet up` (file, environment, options) and open the database directly:
no coordinator needs to run (and for a restore none may).
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cloud.cli._common import JsonOpt, emit, fail
from cloud.errors import CloudError
from cloud.settings import Settings, settings_error

if TYPE_CHECKING:
    from cloud.db import SchemaStatus

__all__ = ["backup", "db_app", "restore"]

db_app = typer.Typer(help="The coordinator's database schema: upgrade it, show its revision.", no_args_is_help=True)

DataDirOpt = Annotated[
    Path | None, typer.Option(help="Database, artifacts, admin token [env EDGEFLEET_DATA_DIR].", show_default=False)
]
DatabaseUrlOpt = Annotated[
    str | None, typer.Option(help="SQLAlchemy URL (default: SQLite in the data dir).", show_default=False)
]
ConfigOpt = Annotated[Path | None, typer.Option(help="Settings file (.toml or .env).", exists=True)]


def _settings(config: Path | None, data_dir: Path | None, database_url: str | None) -> Settings:
    """Settings resolved as `edgefleet up` resolves them; exits with the reason if they are unusable."""
    try:
        return Settings.load(config, data_dir=data_dir, database_url=database_url)
    except (CloudError, ValueError) as exc:
        fail(f"invalid settings: {settings_error(exc)}")


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@db_app.command("upgrade")
def db_upgrade(
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Migrate the database to this edgefleet's schema (`edgefleet up` does the same at start)."""
    from sqlalchemy.exc import SQLAlchemyError  # deferred: `edgefleet --help` stays fast

    from cloud.db import create_db_engine, upgrade_db

    settings = _settings(config, data_dir, database_url)
    try:
        engine = create_db_engine(settings.database_url)
        try:
            upgrade = upgrade_db(engine)
        finally:
            engine.dispose()
    except CloudError as exc:
        fail(str(exc))
    except SQLAlchemyError as exc:  # an unreachable server, a wrong password: say so in one line
        fail(f"cannot use the database: {getattr(exc, 'orig', None) or exc}")
    data = {"from": upgrade.from_revision, "to": upgrade.to_revision, "adopted": upgrade.adopted}
    emit(data, as_json, _render_upgrade)


def _render_upgrade(data: dict[str, Any]) -> str:
    if data["from"] == data["to"] and not data["adopted"]:
        return f"database schema at {data['to']} (head): nothing to do"
    origin = f"release 0.1.0 (no revision; stamped {data['from']})" if data["adopted"] else data["from"] or "empty"
    return f"database schema upgraded: {origin} -> {data['to']}"


@db_app.command("current")
def db_current(
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the database's schema revision and this edgefleet's."""
    from sqlalchemy.exc import SQLAlchemyError

    from cloud.db import create_db_engine, schema_status

    settings = _settings(config, data_dir, database_url)
    try:
        engine = create_db_engine(settings.database_url)
        try:
            status = schema_status(engine)
        finally:
            engine.dispose()
    except CloudError as exc:
        fail(str(exc))
    except SQLAlchemyError as exc:
        fail(f"cannot use the database: {getattr(exc, 'orig', None) or exc}")
    data = {"current": status.current, "head": status.head, "unversioned": status.unversioned, "newer": status.newer}
    emit(data, as_json, lambda _: _render_status(status))


def _render_status(status: SchemaStatus) -> str:
    if status.newer:
        return f"{status.current} (newer than this edgefleet, whose head is {status.head})"
    if status.unversioned:
        return f"none: a database of release 0.1.0 (`edgefleet db upgrade` stamps it and migrates to {status.head})"
    if status.current is None:
        return f"none: an empty database (`edgefleet db upgrade` creates the schema at {status.head})"
    if status.current == status.head:
        return f"{status.current} (head)"
    return f"{status.current} (head is {status.head}: run `edgefleet db upgrade`)"


def backup(
    out: Annotated[Path, typer.Option("--out", "-o", help="Archive to write (.tar.gz).", dir_okay=False)],
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write the database and the data directory's keys, token and artifacts to one file (safe while running)."""
    from cloud.backup import create_backup

    settings = _settings(config, data_dir, database_url)
    try:
        manifest = create_backup(
            database_url=settings.database_url, data_dir=settings.data_dir, out=out, progress=_progress
        )
    except CloudError as exc:
        fail(str(exc))
    data = {"path": str(out), "size": out.stat().st_size, "manifest": asdict(manifest)}
    emit(
        data,
        as_json,
        lambda d: (
            f"backup {d['path']}: {d['manifest']['database']} database at schema "
            f"{d['manifest']['alembic_revision'] or 'none'}, {d['manifest']['files']} data files"
        ),
    )


def restore(
    archive: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A file `edgefleet backup` wrote.")],
    force: Annotated[bool, typer.Option("--force", help="Replace a database and data dir that are not empty.")] = False,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Restore a backup into the configured database and data dir, then upgrade the schema (coordinator stopped)."""
    from cloud.backup import restore_backup

    settings = _settings(config, data_dir, database_url)
    try:
        manifest, upgrade = restore_backup(
            database_url=settings.database_url,
            data_dir=settings.data_dir,
            archive=archive,
            force=force,
            progress=_progress,
        )
    except CloudError as exc:
        fail(str(exc))
    data = {
        "archive": str(archive),
        "manifest": asdict(manifest),
        "from": upgrade.from_revision,
        "to": upgrade.to_revision,
    }
    emit(
        data,
        as_json,
        lambda d: (
            f"restored {d['archive']} (made {d['manifest']['created_at']} by edgefleet "
            f"{d['manifest']['edgefleet_version']}); schema {d['from'] or 'none'} -> {d['to']}"
        ),
    )
