"""Backup and restore of a coordinator: its database and the data-directory files it cannot rebuild, in one file.

A backup is a `.tar.gz`::

    manifest.json       format version, edgefleet version, schema revision, database kind, created_at
    database.sqlite     SQLite: a copy made with the online backup API (consistent while the coordinator writes)
    database.pgdump     PostgreSQL: `pg_dump --format=custom`
    data/artifacts/...  the model files (content-addressed)
    data/admin-token
    data/pki/...        key material, when present (and data/keys/...)

The database is dumped before the files are copied: artifacts are only ever added, so every artifact the dump
refers to is in the archive. A restore puts everything back, then migrates the database to this code's head
(a backup of an older release upgrades on restore).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import MetaData, inspect
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import SQLModel

from cloud import __version__
from cloud.db import Upgrade, create_db_engine, schema_status, upgrade_db
from cloud.errors import BackupError
from cloud.migrations import BASELINE_TABLES, known_revisions

__all__ = ["DATA_ENTRIES", "FORMAT_VERSION", "Manifest", "create_backup", "read_manifest", "restore_backup"]

FORMAT_VERSION = 1
# What of the data directory a backup holds: what the coordinator cannot rebuild. Not the SQLite database
# (dumped separately), not coordinator.json (rewritten at start).
DATA_ENTRIES = ("artifacts", "admin-token", "pki", "keys")
# Where Debian/Ubuntu keep the PostgreSQL client tools of each version when they are not on PATH.
PG_LIB_DIR = Path("/usr/lib/postgresql")

_MANIFEST = "manifest.json"
_DUMPS = {"sqlite": "database.sqlite", "postgresql": "database.pgdump"}
_IN_FLIGHT = (".part", ".tmp")  # temp files of a write still going on (artifact upload, token): never restored

Progress = Callable[[str], None]


def _quiet(_message: str) -> None:
    """The default progress sink."""


@dataclass(frozen=True)
class Manifest:
    """What a backup holds; `alembic_revision` is `None` for a database of release 0.1.0 (no revision yet)."""

    format_version: int
    edgefleet_version: str
    alembic_revision: str | None
    database: str  # sqlite | postgresql
    created_at: str
    files: int = 0  # data-directory files in the archive

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse manifest.json; `BackupError` if it is not one this code can restore."""
        try:
            fields = json.loads(data)
            version = fields["format_version"]
        except (ValueError, KeyError, TypeError) as exc:
            raise BackupError(f"the backup's manifest is unreadable: {exc}") from exc
        if version != FORMAT_VERSION:
            raise BackupError(f"backup format {version} is not supported (this edgefleet reads {FORMAT_VERSION})")
        try:
            return cls(**{k: fields[k] for k in cls.__dataclass_fields__ if k in fields})
        except TypeError as exc:
            raise BackupError(f"the backup's manifest lacks a field: {exc}") from exc


# -- backup ---------------------------------------------------------------------------------------


def create_backup(*, database_url: str, data_dir: Path, out: Path, progress: Progress = _quiet) -> Manifest:
    """Write a backup of the database at `database_url` and of `data_dir` to `out` (written atomically)."""
    kind = database_kind(database_url)
    pg_dump = pg_tool("pg_dump") if kind == "postgresql" else ""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".edgefleet-backup-") as scratch:
        dump = Path(scratch) / _DUMPS[kind]
        if kind == "sqlite":
            progress(f"copying the SQLite database {sqlite_path(database_url)}")
            revision = _backup_sqlite(sqlite_path(database_url), dump)
        else:
            progress("dumping the PostgreSQL database with pg_dump")
            revision = _revision(database_url)
            _run_pg(pg_dump, "--format=custom", f"--file={dump}", database_url=database_url)
        progress(f"database dumped ({_size(dump.stat().st_size)}, schema revision {revision or 'none'})")
        files = list(_data_files(data_dir))
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            edgefleet_version=__version__,
            alembic_revision=revision,
            database=kind,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            files=sum(1 for path in files if path.is_file()),
        )
        progress(f"archiving {manifest.files} data files from {data_dir}")
        partial = out.with_name(out.name + ".part")
        # 0600 from the start: the archive holds the admin token and private keys.
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        # dereference: a data entry that is a symlink (artifacts on another disk) is archived as what it points to.
        try:
            with (
                os.fdopen(fd, "wb") as raw,
                tarfile.open(fileobj=raw, mode="w:gz", compresslevel=6, dereference=True) as tar,
            ):
                _add_bytes(tar, _MANIFEST, json.dumps(asdict(manifest), indent=2).encode() + b"\n")
                tar.add(dump, arcname=dump.name)
                for path in files:
                    _add_data_file(tar, path, f"data/{path.relative_to(data_dir).as_posix()}")
            os.replace(partial, out)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    progress(f"wrote {out} ({_size(out.stat().st_size)})")
    return manifest


def _backup_sqlite(path: Path, dump: Path) -> str | None:
    """Copy the database with SQLite's backup API; returns the schema revision of the copy."""
    if not path.is_file():
        raise BackupError(f"no SQLite database at {path}")
    with closing(sqlite3.connect(path, timeout=30)) as source, closing(sqlite3.connect(dump)) as copy:
        # In one step (pages=-1): a step-wise copy restarts whenever the running coordinator writes.
        source.backup(copy, pages=-1)
        return _sqlite_revision(copy)


def _sqlite_revision(connection: sqlite3.Connection) -> str | None:
    try:
        row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.OperationalError:  # no alembic_version: empty, or made by release 0.1.0
        return None
    return str(row[0]) if row else None


def _revision(database_url: str) -> str | None:
    engine = create_db_engine(database_url)
    try:
        with _database_errors(database_url):
            return schema_status(engine).current
    finally:
        engine.dispose()


@contextmanager
def _database_errors(database_url: str) -> Iterator[None]:
    """Report a database that cannot be reached or read as a `BackupError` naming it (password hidden)."""
    try:
        yield
    except SQLAlchemyError as exc:
        where = make_url(database_url).render_as_string(hide_password=True)
        raise BackupError(f"the database {where} failed: {getattr(exc, 'orig', None) or exc}") from exc


def _data_files(data_dir: Path) -> Iterator[Path]:
    """The files and directories of `DATA_ENTRIES` under `data_dir`, parents first, in a stable order."""
    for name in DATA_ENTRIES:
        top = data_dir / name
        if top.is_file():
            yield top
        elif top.is_dir():
            yield top
            for root, dirs, names in os.walk(top):
                dirs.sort()
                yield from (Path(root, d) for d in dirs)
                yield from (Path(root, n) for n in sorted(names) if not n.endswith(_IN_FLIGHT))


def _add_data_file(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
    with suppress(FileNotFoundError):  # a temp file that was renamed or removed while we walked
        tar.add(path, arcname=arcname, recursive=False)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(datetime.now(UTC).timestamp())
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


# -- restore --------------------------------------------------------------------------------------


def read_manifest(archive: Path) -> Manifest:
    """The manifest of the backup at `archive`; `BackupError` if it is not a readable edgefleet backup."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            member = tar.extractfile(_MANIFEST)
            if member is None:
                raise KeyError(_MANIFEST)
            return Manifest.from_json(member.read())
    except (OSError, tarfile.TarError, KeyError) as exc:
        raise BackupError(f"{archive} is not an edgefleet backup ({exc})") from exc


def restore_backup(
    *, database_url: str, data_dir: Path, archive: Path, force: bool = False, progress: Progress = _quiet
) -> tuple[Manifest, Upgrade]:
    """Restore `archive` into the database at `database_url` and `data_dir`, then upgrade the schema.

    Refuses a non-empty target unless `force`, a running coordinator on `data_dir`, a backup of another
    database kind, and one whose schema is newer than this code.
    """
    manifest = read_manifest(archive)
    kind = database_kind(database_url)
    if manifest.database != kind:
        raise BackupError(f"the backup holds a {manifest.database} database; the target is {kind}")
    if manifest.alembic_revision is not None and manifest.alembic_revision not in known_revisions():
        raise BackupError(
            f"the backup's schema revision {manifest.alembic_revision} is newer than this edgefleet knows "
            f"(its newest is {known_revisions()[-1]}): restore it with the version that made it"
        )
    pg_restore = pg_tool("pg_restore") if kind == "postgresql" else ""  # before anything is touched
    _refuse_running_coordinator(data_dir)
    engine = create_db_engine(database_url)
    try:
        with _database_errors(database_url):
            return _restore(
                engine,
                manifest=manifest,
                database_url=database_url,
                data_dir=data_dir,
                archive=archive,
                force=force,
                pg_restore=pg_restore,
                progress=progress,
            )
    finally:
        engine.dispose()


def _restore(
    engine: Engine,
    *,
    manifest: Manifest,
    database_url: str,
    data_dir: Path,
    archive: Path,
    force: bool,
    pg_restore: str,
    progress: Progress,
) -> tuple[Manifest, Upgrade]:
    """The steps of `restore_backup` once the archive has been checked: database, files, schema upgrade."""
    if not force:
        _refuse_non_empty(engine, data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    with _unpacked(archive, data_dir) as unpacked:
        dump = unpacked / _DUMPS[manifest.database]
        if manifest.database == "sqlite":
            progress(f"writing the SQLite database {sqlite_path(database_url)}")
            engine.dispose()  # no pooled connection may hold the file while it is replaced
            _restore_sqlite(dump, sqlite_path(database_url))
        else:
            _drop_edgefleet_tables(engine)
            progress("restoring the PostgreSQL database with pg_restore")
            engine.dispose()
            _run_pg(
                pg_restore,
                "--clean",
                "--if-exists",
                "--no-owner",
                "--single-transaction",
                str(dump),
                database_url=database_url,
            )
        progress(f"restoring {manifest.files} data files into {data_dir}")
        _put_data_in_place(unpacked / "data", data_dir)
    progress("upgrading the database schema")
    upgrade = upgrade_db(engine)
    progress(f"restored {archive} (schema {upgrade.from_revision or 'none'} -> {upgrade.to_revision})")
    return manifest, upgrade


def _refuse_running_coordinator(data_dir: Path) -> None:
    """A coordinator running on `data_dir` (its coordinator.json names a live pid) must be stopped first."""
    info = data_dir / "coordinator.json"
    try:
        pid = int(json.loads(info.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return  # a stale file left by a coordinator that was killed
    except PermissionError:
        pass  # alive, owned by someone else
    raise BackupError(f"a coordinator (pid {pid}) is running on {data_dir}: stop it before restoring")


def _edgefleet_tables() -> set[str]:
    return set(BASELINE_TABLES) | set(SQLModel.metadata.tables) | {"alembic_version"}


def _refuse_non_empty(engine: Engine, data_dir: Path) -> None:
    tables = sorted(_edgefleet_tables() & set(inspect(engine).get_table_names()))
    present = [name for name in DATA_ENTRIES if _has_content(data_dir / name)]
    if tables or present:
        found = [f"tables {', '.join(tables[:3])}{', ...' if len(tables) > 3 else ''}"] if tables else []
        found += [str(data_dir / name) for name in present]
        raise BackupError(f"the target is not empty ({'; '.join(found)}): pass --force to replace it")


def _has_content(path: Path) -> bool:
    if path.is_dir():
        return any(p.is_file() for p in path.rglob("*"))
    return path.exists()


@contextmanager
def _unpacked(archive: Path, data_dir: Path) -> Iterator[Path]:
    """The archive extracted into a scratch directory inside `data_dir` (same file system: moves are renames)."""
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".restore-") as scratch:
        root = Path(scratch)
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = _checked_members(tar, archive)
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: a second line of defence
                    tar.extractall(root, members=members, filter="data")
                else:
                    tar.extractall(root, members=members)
        except (OSError, tarfile.TarError) as exc:
            raise BackupError(f"cannot unpack {archive}: {exc}") from exc
        for member in members:  # the data filter drops directory modes: put back those of pki/ and keys/
            if member.isdir():
                (root / member.name).chmod(member.mode & 0o755)
        yield root


def _checked_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """The archive's members, if all are plain files and directories inside it (a backup holds nothing else)."""
    members = tar.getmembers()
    for member in members:
        parts = Path(member.name).parts
        if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
            raise BackupError(f"{archive} holds {member.name!r}, which no edgefleet backup contains: refusing it")
    return members


def _restore_sqlite(dump: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(dump)) as source, closing(sqlite3.connect(target, timeout=30)) as database:
        source.backup(database, pages=-1)


def _drop_edgefleet_tables(engine: Engine) -> None:
    """Drop the tables edgefleet knows (pg_restore --clean drops only those in the dump; a newer schema has more)."""
    with engine.begin() as connection:
        present = sorted(_edgefleet_tables() & set(inspect(connection).get_table_names()))
        if present:
            metadata = MetaData()
            metadata.reflect(connection, only=present)
            metadata.drop_all(connection)


def _put_data_in_place(unpacked: Path, data_dir: Path) -> None:
    """Replace each of `DATA_ENTRIES` in `data_dir` with the backup's (an entry the backup lacks stays)."""
    for name in DATA_ENTRIES:
        source = unpacked / name
        if not source.exists():
            continue
        target = data_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(source, target)


# -- databases ------------------------------------------------------------------------------------


def database_kind(database_url: str) -> str:
    """`sqlite` or `postgresql`; `BackupError` for any other database."""
    kind = make_url(database_url).get_backend_name()
    if kind not in _DUMPS:
        raise BackupError(f"backups support SQLite and PostgreSQL, not {kind}")
    if kind == "sqlite":
        sqlite_path(database_url)
    return kind


def sqlite_path(database_url: str) -> Path:
    """The file of a SQLite URL; `BackupError` for an in-memory database."""
    database = make_url(database_url).database
    if not database or database == ":memory:":
        raise BackupError("an in-memory SQLite database cannot be backed up or restored")
    return Path(database)


def pg_tool(name: str) -> str:
    """Path of a PostgreSQL client program (`pg_dump`, `pg_restore`): PATH first, then the newest installed."""
    if found := shutil.which(name):
        return found
    candidates = sorted(PG_LIB_DIR.glob(f"*/bin/{name}"), key=lambda p: _major(p.parent.parent.name))
    if candidates:
        return str(candidates[-1])
    raise BackupError(
        f"{name} is not installed: install the PostgreSQL client tools (`apt-get install postgresql-client`, "
        "the same major version as the server or newer) and put them on PATH"
    )


def _major(version: str) -> int:
    return int(version) if version.isdigit() else -1


def _run_pg(tool: str, *args: str, database_url: str) -> None:
    """Run a PostgreSQL client tool (a path from `pg_tool`) on the database at `database_url`."""
    url = make_url(database_url)
    env = dict(os.environ)
    if url.password is not None:
        env["PGPASSWORD"] = str(url.password)  # never on the command line, where `ps` would show it
    result = subprocess.run(
        [tool, *args, f"--dbname={_libpq_uri(url)}"], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        name = Path(tool).name
        raise BackupError(f"{name} failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")


def _libpq_uri(url: URL) -> str:
    """A libpq connection URI (`postgresql://user@host:port/db?sslmode=...`) without the password."""
    return url.set(drivername="postgresql", password=None).render_as_string(hide_password=False)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
