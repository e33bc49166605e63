"""Schema migrations: empty databases, databases of the previous release, newer ones, concurrent starts, failures."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlmodel import SQLModel
from typer.testing import CliRunner

import cloud.cli as cli
from cloud.app import create_app
from cloud.db import Upgrade, create_db_engine, schema_status, upgrade_db
from cloud.errors import ConfigurationError
from cloud.migrations import BASELINE, BASELINE_TABLES, alembic_config, head_revision
from cloud.settings import Settings
from tests.cloud.db_helpers import RELEASE_TOKEN, load_release_0_1_0, schema_of, scratch_migrations
from tests.services import require_module


def revision_in(database_url: str) -> str | None:
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def cli_run(*args: str) -> Any:
    return CliRunner().invoke(cli.build_app(load_plugins=False), list(args))


def test_empty_database_is_migrated_from_scratch_and_then_left_alone(database_url: str) -> None:
    engine = create_db_engine(database_url)
    try:
        assert upgrade_db(engine) == Upgrade(from_revision=None, to_revision=head_revision())
        again = upgrade_db(engine)
        assert again == Upgrade(from_revision=head_revision(), to_revision=head_revision())
        assert not again.changed
        status = schema_status(engine)
        assert (status.current, status.head, status.newer, status.unversioned) == (
            head_revision(),
            head_revision(),
            False,
            False,
        )
    finally:
        engine.dispose()


def test_models_match_the_migrations(database_url: str) -> None:
    """A model change without a revision fails here: write one with `python -m cloud.migrations revision`."""
    engine = create_db_engine(database_url)
    try:
        upgrade_db(engine)
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, SQLModel.metadata) == []
    finally:
        engine.dispose()


def test_baseline_revision_builds_the_schema_of_release_0_1_0(database_url: str, tmp_path: Path) -> None:
    migrated = create_db_engine(database_url)
    released_url = f"sqlite:///{tmp_path / 'released.db'}" if database_url.startswith("sqlite") else None
    try:
        with migrated.begin() as connection:
            command.upgrade(alembic_config(connection), BASELINE)
        if released_url is None:  # PostgreSQL: the release's dump, loaded beside the migrated schema's database
            require_module("psycopg", "PostgreSQL tests need the psycopg driver (a base dependency)")
            from tests.services import fresh_postgres_database

            with fresh_postgres_database() as other:
                load_release_0_1_0(other)
                released = create_db_engine(other)
                try:
                    assert schema_of(migrated) == schema_of(released)
                finally:
                    released.dispose()
            return
        load_release_0_1_0(released_url)
        released = create_db_engine(released_url)
        try:
            assert schema_of(migrated) == schema_of(released)
            assert set(schema_of(released)) == BASELINE_TABLES
            # SQLite keeps each table's CREATE statement: the very same text as release 0.1.0's create_all.
            sql = "SELECT name, sql FROM sqlite_master WHERE name NOT LIKE '%alembic%' ORDER BY name"
            with migrated.connect() as a, released.connect() as b:
                assert list(a.exec_driver_sql(sql)) == list(b.exec_driver_sql(sql))
        finally:
            released.dispose()
    finally:
        migrated.dispose()


def test_database_of_the_previous_release_upgrades_with_its_data(database_url: str, tmp_path: Path) -> None:
    load_release_0_1_0(database_url)
    engine = create_db_engine(database_url)
    try:
        assert schema_status(engine).unversioned
    finally:
        engine.dispose()

    settings = Settings(
        data_dir=tmp_path / "coordinator", database_url=database_url, admin_token=RELEASE_TOKEN, rollout_tick_s=0
    )
    app = create_app(settings, enable_mqtt=False)
    auth = {"Authorization": f"Bearer {RELEASE_TOKEN}"}
    with TestClient(app) as client:  # the lifespan upgrades the database
        assert revision_in(database_url) == head_revision()

        models = client.get("/api/v1/models", headers=auth)
        assert models.status_code == 200, models.text
        [model] = models.json()["data"]
        assert model["name"] == "digits"
        assert [v["version"] for v in model["versions"]] == ["1.0", "2.0"]
        assert model["versions"][0]["inputs"][0]["name"] == "input"

        devices = client.get("/api/v1/devices", headers=auth)
        assert devices.status_code == 200, devices.text
        by_id = {d["id"]: d for d in devices.json()["data"]}
        assert sorted(by_id) == ["cam-01", "cam-02", "cam-03"]
        assert by_id["cam-01"]["active_model_version"] == "1.0"
        assert by_id["cam-01"]["update_phase"] == "active"
        assert by_id["cam-01"]["tags"] == {"site": "lab"}
        assert by_id["cam-03"]["inference_count"] == 300

        windows = client.get("/api/v1/devices/cam-01/telemetry", headers=auth)
        assert [w["seq"] for w in windows.json()["data"]] == [0, 1, 2]

        deployments = client.get("/api/v1/deployments", headers=auth).json()["data"]
        first = min(deployments, key=lambda d: d["id"])
        assert sorted(t["device_id"] for t in first["targets"]) == ["cam-01", "cam-02"]

        [rollout] = client.get("/api/v1/rollouts", headers=auth).json()["data"]
        detail = client.get(f"/api/v1/rollouts/{rollout['id']}", headers=auth).json()
        assert detail["model_version"] == "2.0"
        assert [d["kind"] for d in detail["decisions"]][:2] == ["rollout_started", "wave_started"]


def test_newer_database_is_refused(database_url: str, tmp_path: Path) -> None:
    engine = create_db_engine(database_url)
    try:
        upgrade_db(engine)
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        with pytest.raises(ConfigurationError) as refused:
            upgrade_db(engine)
        assert "9999" in str(refused.value) and head_revision() in str(refused.value)
        assert schema_status(engine).newer
    finally:
        engine.dispose()
    result = cli_run("db", "upgrade", "--database-url", database_url)
    assert result.exit_code == 1
    assert "9999" in result.output and "newer edgefleet" in result.output
    settings = Settings(data_dir=tmp_path / "coordinator", database_url=database_url, rollout_tick_s=0)
    with pytest.raises(ConfigurationError, match="9999"), TestClient(create_app(settings, enable_mqtt=False)):
        pass  # the coordinator does not start


def test_partial_schema_without_revision_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'partial.db'}"
    engine = create_db_engine(url)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE model (id INTEGER PRIMARY KEY, name VARCHAR(128))")
        with pytest.raises(ConfigurationError, match="missing: deployment, deployment_target"):
            upgrade_db(engine)
    finally:
        engine.dispose()


def test_concurrent_starts_migrate_once(database_url: str) -> None:
    engines = [create_db_engine(database_url) for _ in range(3)]
    barrier = threading.Barrier(len(engines))
    results: list[Upgrade] = []
    errors: list[BaseException] = []

    def start(engine: Any) -> None:
        barrier.wait()
        try:
            results.append(upgrade_db(engine))
        except BaseException as exc:  # reported below with the others
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert errors == []
        assert sorted(r.from_revision or "" for r in results) == ["", head_revision(), head_revision()]
        with engines[0].connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    finally:
        for engine in engines:
            engine.dispose()


def test_failed_migration_leaves_the_database_as_it_was(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = create_db_engine(database_url)
    try:
        upgrade_db(engine)
        before = schema_of(engine)
        scratch_migrations(
            tmp_path,
            monkeypatch,
            '    op.create_table("scratch", sa.Column("id", sa.Integer(), primary_key=True))\n'
            '    with op.batch_alter_table("model") as batch:\n'
            '        batch.add_column(sa.Column("note", sa.String(), nullable=True))\n'
            '    op.execute("INSERT INTO scratch (id) VALUES (1)")\n'
            '    raise RuntimeError("the migration fails half-way")\n',
        )
        with pytest.raises(RuntimeError, match="half-way"):
            upgrade_db(engine)
        assert schema_of(engine) == before
        assert schema_status(engine).current != "9001"
    finally:
        engine.dispose()


def test_table_rebuild_keeps_rows_that_reference_it(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite rebuilds a table to alter it; telemetry, events and targets pointing at devices must survive."""
    load_release_0_1_0(database_url)
    scratch = scratch_migrations(
        tmp_path,
        monkeypatch,
        '    with op.batch_alter_table("device") as batch:  # SQLite: a rebuild (copy, drop, rename)\n'
        '        batch.alter_column("desired_generation", type_=sa.BigInteger(), existing_nullable=False)\n',
    )
    engine = create_db_engine(database_url)
    try:
        upgrade = upgrade_db(engine)
        assert (upgrade.from_revision, upgrade.to_revision, upgrade.adopted) == (BASELINE, scratch, True)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM device")).scalar() == 3
            assert connection.execute(text("SELECT count(*) FROM telemetry_window")).scalar() == 9
            assert connection.execute(text("SELECT count(*) FROM deployment_target")).scalar() == 3
            if engine.dialect.name == "sqlite":  # enforcement is back on for the connections the app gets
                assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        columns = {c[0]: c[1] for c in schema_of(engine, {"device"})["device"]["columns"]}
        assert columns["desired_generation"] == "BIGINT"
    finally:
        engine.dispose()


def test_db_commands_show_and_upgrade_the_revision(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'data' / 'edgefleet.db'}"
    load_release_0_1_0(url)
    current = cli_run("db", "current", "--data-dir", str(tmp_path / "data"))
    assert current.exit_code == 0, current.output
    assert "release 0.1.0" in current.output

    upgraded = cli_run("db", "upgrade", "--data-dir", str(tmp_path / "data"), "--json")
    assert upgraded.exit_code == 0, upgraded.output
    assert json.loads(upgraded.stdout) == {"from": BASELINE, "to": head_revision(), "adopted": True}

    again = cli_run("db", "upgrade", "--database-url", url)
    assert again.exit_code == 0 and "nothing to do" in again.output
    shown = json.loads(cli_run("db", "current", "--database-url", url, "--json").stdout)
    assert shown == {"current": head_revision(), "head": head_revision(), "unversioned": False, "newer": False}
    assert f"{head_revision()} (head)" in cli_run("db", "current", "--database-url", url).output


def test_db_commands_read_settings_like_up(tmp_path: Path) -> None:
    settings_file = tmp_path / "coordinator.toml"
    settings_file.write_text(f'[coordinator]\ndata_dir = "{tmp_path / "from-file"}"\n')
    result = cli_run("db", "upgrade", "--config", str(settings_file))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "from-file" / "edgefleet.db").exists()
    bad = cli_run("db", "current", "--database-url", "not a url")
    assert bad.exit_code == 1 and "cannot use database URL 'not a url'" in bad.output
