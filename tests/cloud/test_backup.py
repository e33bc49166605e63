"""Backup and restore: the registry, devices, artifacts and keys come back, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import stat
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session
from typer.testing import CliRunner

import cloud.backup
import cloud.cli as cli
from cloud.app import create_app
from cloud.backup import create_backup, read_manifest, restore_backup
from cloud.errors import BackupError
from cloud.migrations import head_revision
from cloud.models import Device, TelemetryRecord
from cloud.settings import Settings
from tests.cloud.db_helpers import load_release_0_1_0


def cli_run(*args: str) -> Any:
    return CliRunner().invoke(cli.build_app(load_plugins=False), list(args))


@pytest.fixture
def target_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A second, empty database of the same kind as `database_url`: where a backup is restored."""
    if database_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'restored' / 'edgefleet.db'}"
        return
    from tests.services import fresh_postgres_database

    with fresh_postgres_database() as url:
        yield url


@contextmanager
def coordinator(data_dir: Path, database_url: str) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """The coordinator's API (no MQTT, no rollout thread) and its admin credentials."""
    settings = Settings(data_dir=data_dir, database_url=database_url, rollout_tick_s=0, port=8080)
    app = create_app(settings, enable_mqtt=False)
    with TestClient(app) as client:
        token = app.state.coordinator.admin_token
        yield client, {"Authorization": f"Bearer {token}"}


def add_device(client: TestClient, device_id: str, tags: dict[str, str] | None = None) -> None:
    """A device row as enrolment leaves it (written directly: how devices join is not what is tested here)."""
    with Session(client.app.state.coordinator.engine) as session:  # type: ignore[attr-defined]
        session.add(Device(id=device_id, tags=tags or {}))
        session.commit()


def fill(client: TestClient, auth: dict[str, str], model: bytes) -> str:
    """A model version, a device and a deployment; returns the artifact's sha256."""
    pushed = client.post(
        "/api/v1/models/digits/versions",
        data={"version": "1.0"},
        files={"file": ("model.onnx", model, "application/octet-stream")},
        headers=auth,
    )
    assert pushed.status_code == 201, pushed.text
    add_device(client, "cam-1", {"site": "lab"})
    deployed = client.post(
        "/api/v1/deployments",
        json={"model": "digits", "version": "1.0", "target": {"device_ids": ["cam-1"]}},
        headers=auth,
    )
    assert deployed.status_code == 201, deployed.text
    return str(pushed.json()["sha256"])


def registry(client: TestClient, auth: dict[str, str]) -> dict[str, Any]:
    """What a restore must bring back, as the API shows it."""
    models = client.get("/api/v1/models", headers=auth).json()["data"]
    devices = client.get("/api/v1/devices", headers=auth).json()["data"]
    deployments = client.get("/api/v1/deployments", headers=auth).json()["data"]
    return {
        "models": [(m["name"], [(v["version"], v["sha256"], v["size"]) for v in m["versions"]]) for m in models],
        "devices": [(d["id"], d["tags"], d["desired_generation"], d["first_seen"]) for d in devices],
        "deployments": [(d["id"], d["model_version"], [t["device_id"] for t in d["targets"]]) for d in deployments],
    }


def add_keys(data_dir: Path) -> None:
    """Key material the coordinator cannot rebuild: a keys/ directory (0700) with a private key (0600)."""
    keys = data_dir / "keys"
    keys.mkdir(mode=0o700)
    (keys / "root.key").write_text("-----BEGIN PRIVATE KEY-----\nnot really\n-----END PRIVATE KEY-----\n")
    (keys / "root.key").chmod(0o600)


def test_backup_restores_registry_and_artifacts(
    database_url: str, target_url: str, tmp_path: Path, digits_model_bytes: bytes
) -> None:
    source = tmp_path / "source"
    with coordinator(source, database_url) as (client, auth):
        sha256 = fill(client, auth, digits_model_bytes)
        before = registry(client, auth)
    add_keys(source)
    archive = tmp_path / "backups" / "edgefleet.tar.gz"

    made = cli_run("backup", "--out", str(archive), "--data-dir", str(source), "--database-url", database_url, "--json")
    assert made.exit_code == 0, made.output
    manifest = json.loads(made.stdout)["manifest"]
    kind = "sqlite" if database_url.startswith("sqlite") else "postgresql"
    assert manifest["database"] == kind and manifest["alembic_revision"] == head_revision()
    assert manifest["format_version"] == 1 and manifest["edgefleet_version"] and manifest["created_at"]
    assert "archiving" in made.stderr  # progress goes to stderr, the result to stdout
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600  # it holds the admin token and keys

    restored = tmp_path / "restored"
    result = cli_run("restore", str(archive), "--data-dir", str(restored), "--database-url", target_url, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["to"] == head_revision()

    assert (restored / "admin-token").read_text() == (source / "admin-token").read_text()
    assert stat.S_IMODE((restored / "keys").stat().st_mode) == 0o700
    assert stat.S_IMODE((restored / "keys" / "root.key").stat().st_mode) == 0o600
    with coordinator(restored, target_url) as (client, auth):
        assert registry(client, auth) == before
        artifact = client.get(f"/api/v1/artifacts/{sha256}", headers=auth)
        assert artifact.status_code == 200 and artifact.content == digits_model_bytes


def test_backup_while_coordinator_writes(tmp_path: Path) -> None:
    """The SQLite copy is a consistent snapshot: a writer committing two rows at a time is never seen half-way."""
    data_dir = tmp_path / "data"
    database_url = f"sqlite:///{data_dir / 'edgefleet.db'}"
    stop = threading.Event()
    errors: list[BaseException] = []
    written = [0]

    with coordinator(data_dir, database_url) as (client, _auth):
        add_device(client, "cam-1")
        engine = client.app.state.coordinator.engine  # type: ignore[attr-defined]

        def write() -> None:
            try:
                while not stop.is_set():
                    seq = written[0]
                    with Session(engine) as session:
                        for offset in (0, 1):
                            session.add(
                                TelemetryRecord(device_id="cam-1", seq=seq + offset, inference_count=1, error_count=0)
                            )
                        session.commit()
                    written[0] = seq + 2
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        try:
            archives = []
            for index in range(3):
                while written[0] < 20 * (index + 1):  # let the writer get going between backups
                    assert writer.is_alive(), errors
                    time.sleep(0.005)
                archive = tmp_path / f"backup-{index}.tar.gz"
                result = cli_run("backup", "--out", str(archive), "--data-dir", str(data_dir))
                assert result.exit_code == 0, result.output
                archives.append(archive)
        finally:
            stop.set()
            writer.join(30)
    assert errors == []

    counts = []
    for archive in archives:
        with tarfile.open(archive) as tar:
            member = tar.extractfile("database.sqlite")
            assert member is not None
            copy = tmp_path / f"{archive.name}.sqlite"
            copy.write_bytes(member.read())
        with closing(sqlite3.connect(copy)) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            counts.append(db.execute("SELECT count(*) FROM telemetry_window").fetchone()[0])
    assert all(count % 2 == 0 for count in counts), counts
    assert counts == sorted(counts) and counts[0] >= 20 and counts[-1] <= written[0]

    restored = tmp_path / "restored"
    manifest, upgrade = restore_backup(
        database_url=f"sqlite:///{restored / 'edgefleet.db'}", data_dir=restored, archive=archives[-1]
    )
    assert manifest.alembic_revision == upgrade.to_revision == head_revision()


def test_restore_refuses_a_non_empty_target_unless_forced(
    database_url: str, tmp_path: Path, digits_model_bytes: bytes
) -> None:
    data_dir = tmp_path / "data"
    with coordinator(data_dir, database_url) as (client, auth):
        fill(client, auth, digits_model_bytes)
        backed_up = registry(client, auth)
    archive = tmp_path / "edgefleet.tar.gz"
    create_backup(database_url=database_url, data_dir=data_dir, out=archive)
    with coordinator(data_dir, database_url) as (client, auth):  # changes made after the backup
        add_device(client, "cam-2")
        assert registry(client, auth) != backed_up

    refused = cli_run("restore", str(archive), "--data-dir", str(data_dir), "--database-url", database_url)
    assert refused.exit_code == 1
    assert "not empty" in refused.output and "--force" in refused.output

    forced = cli_run("restore", str(archive), "--force", "--data-dir", str(data_dir), "--database-url", database_url)
    assert forced.exit_code == 0, forced.output
    assert "restored" in forced.stdout
    with coordinator(data_dir, database_url) as (client, auth):
        assert registry(client, auth) == backed_up


def test_backup_of_the_previous_release_upgrades_on_restore(database_url: str, target_url: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "release"
    data_dir.mkdir()
    url = f"sqlite:///{data_dir / 'edgefleet.db'}" if database_url.startswith("sqlite") else database_url
    load_release_0_1_0(url)
    (data_dir / "admin-token").write_text("release-token\n")
    archive = tmp_path / "release.tar.gz"
    manifest = create_backup(database_url=url, data_dir=data_dir, out=archive)
    assert manifest.alembic_revision is None  # release 0.1.0 had no revision table

    restored = tmp_path / "restored"
    _, upgrade = restore_backup(database_url=target_url, data_dir=restored, archive=archive)
    assert upgrade.adopted and upgrade.to_revision == head_revision()
    current = cli_run("db", "current", "--database-url", target_url, "--json")
    assert json.loads(current.stdout)["current"] == head_revision()


def rewrite(archive: Path, out: Path, *, extra: tuple[tuple[str, bytes], ...] = (), **changes: Any) -> None:
    """A copy of `archive` with `changes` applied to its manifest and `extra` files added."""
    with tarfile.open(archive) as source, tarfile.open(out, "w:gz") as copy:
        for member in source.getmembers():
            data = source.extractfile(member) if member.isfile() else None
            if member.name == "manifest.json" and data is not None:
                body = json.dumps({**json.loads(data.read()), **changes}).encode()
                member.size = len(body)
                data = io.BytesIO(body)
            copy.addfile(member, data)
        for name, body in extra:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            copy.addfile(info, io.BytesIO(body))


def test_restore_refuses_what_it_cannot_restore_safely(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    url = f"sqlite:///{data_dir / 'edgefleet.db'}"
    with coordinator(data_dir, url):
        pass
    archive = tmp_path / "ok.tar.gz"
    create_backup(database_url=url, data_dir=data_dir, out=archive)
    target = {"database_url": f"sqlite:///{tmp_path / 'new' / 'edgefleet.db'}", "data_dir": tmp_path / "new"}

    newer = tmp_path / "newer.tar.gz"
    rewrite(archive, newer, alembic_revision="9999")
    with pytest.raises(BackupError, match=f"9999 is newer than this edgefleet knows .*{head_revision()}"):
        restore_backup(archive=newer, **target)

    other_format = tmp_path / "format.tar.gz"
    rewrite(archive, other_format, format_version=2)
    with pytest.raises(BackupError, match="format 2 is not supported"):
        restore_backup(archive=other_format, **target)

    postgres = tmp_path / "postgres.tar.gz"
    rewrite(archive, postgres, database="postgresql")
    with pytest.raises(BackupError, match="holds a postgresql database; the target is sqlite"):
        restore_backup(archive=postgres, **target)

    not_a_backup = tmp_path / "notes.txt"
    not_a_backup.write_text("hello")
    with pytest.raises(BackupError, match="is not an edgefleet backup"):
        read_manifest(not_a_backup)

    running = tmp_path / "running"
    running.mkdir()
    (running / "coordinator.json").write_text(json.dumps({"pid": os.getpid()}))
    with pytest.raises(BackupError, match=f"pid {os.getpid()}.*stop it before restoring"):
        restore_backup(archive=archive, database_url=f"sqlite:///{running / 'edgefleet.db'}", data_dir=running)
    assert not (tmp_path / "new").exists()  # nothing was touched by any refusal


def test_archive_with_a_path_out_of_the_data_dir_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    url = f"sqlite:///{data_dir / 'edgefleet.db'}"
    with coordinator(data_dir, url):
        pass
    archive = tmp_path / "ok.tar.gz"
    create_backup(database_url=url, data_dir=data_dir, out=archive)
    evil = tmp_path / "evil.tar.gz"
    rewrite(archive, evil, extra=(("data/../../escaped", b"evil"),))
    with pytest.raises(BackupError, match="refusing it"):
        restore_backup(
            archive=evil, database_url=f"sqlite:///{tmp_path / 'new' / 'edgefleet.db'}", data_dir=tmp_path / "new"
        )
    assert not (tmp_path / "escaped").exists()


def test_missing_pg_dump_is_reported_with_the_package_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(cloud.backup, "PG_LIB_DIR", tmp_path / "no-postgresql")
    result = cli_run(
        "backup", "--out", str(tmp_path / "b.tar.gz"), "--database-url", "postgresql://nobody@127.0.0.1:1/none"
    )
    assert result.exit_code == 1
    assert "pg_dump is not installed" in result.output and "apt-get install postgresql-client" in result.output
    assert not (tmp_path / "b.tar.gz").exists()


def test_unreachable_database_is_reported_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cloud.backup, "pg_tool", lambda name: name)  # the database is asked first: no pg_dump needed
    url = "postgresql+psycopg://edgefleet:hunter2@127.0.0.1:1/edgefleet"  # nothing listens on port 1
    for args in (("backup", "--out", str(tmp_path / "b.tar.gz")), ("db", "upgrade")):
        result = cli_run(*args, "--database-url", url)
        assert result.exit_code == 1, result.output
        assert "Connection refused" in result.output and "Traceback" not in result.output
        assert "hunter2" not in result.output
