"""The commands of docs/operations.md run as written (paths and URLs swapped for the test's), scenario by scenario.

Each `sh` block of the doc is preceded by `<!-- scenario: NAME -->`; a scenario's blocks run in order as one
bash script, after the test has set up what the scenario starts from (an installation of release 0.1.0).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from cloud.db import create_db_engine, schema_status
from cloud.migrations import head_revision
from tests.cloud.db_helpers import load_release_0_1_0

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "operations.md"
SCENARIOS = ("sqlite", "postgresql", "developer", "developer-postgresql")
BIN = Path(sys.executable).parent


def scenario_blocks() -> list[tuple[str, str]]:
    """(scenario, commands) of every sh block, in document order."""
    return re.findall(r"<!-- scenario: ([\w-]+) -->\n```sh\n(.*?)```", DOC.read_text(), re.S)


def script(scenario: str, replacements: dict[str, str]) -> str:
    body = "".join(block for name, block in scenario_blocks() if name == scenario)
    for placeholder, value in replacements.items():
        body = body.replace(placeholder, value)
    return body


def run(scenario: str, replacements: dict[str, str], *, cwd: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """Run a scenario's commands with the venv's `edgefleet` and `python` first on PATH, in a home of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", HOME=str(home), COLUMNS="200")
    env["PYTHONPATH"] = str(ROOT)  # this checkout's code, whichever the venv's `edgefleet` was installed from
    env["EDGEFLEET_CONFIG"] = str(home / "cli.toml")
    commands = script(scenario, replacements)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-xc", commands],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"{commands}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    return result


def test_every_command_block_belongs_to_a_tested_scenario() -> None:
    blocks = re.findall(r"(?:<!-- scenario: ([\w-]+) -->\n)?```sh\n", DOC.read_text())
    assert blocks and all(name in SCENARIOS for name in blocks), blocks
    assert {name for name, _ in scenario_blocks()} == set(SCENARIOS)


def release_0_1_0_install(data_dir: Path, database_url: str) -> None:
    """What an operator of release 0.1.0 has: its database, an admin token, an artifact."""
    data_dir.mkdir(parents=True)
    load_release_0_1_0(database_url)
    (data_dir / "admin-token").write_text("token-of-release-0.1.0\n")
    (data_dir / "artifacts" / "ab").mkdir(parents=True)
    (data_dir / "artifacts" / "ab" / ("ab" + "0" * 62)).write_bytes(b"model bytes")


def test_sqlite_scenario(tmp_path: Path) -> None:
    data_dir = tmp_path / "var-lib-edgefleet"
    release_0_1_0_install(data_dir, f"sqlite:///{data_dir / 'edgefleet.db'}")
    replacements = {
        "/var/lib/edgefleet": str(data_dir),
        "/var/backups": str(tmp_path / "backups"),
        "/srv/edgefleet": str(tmp_path / "srv"),
    }
    result = run("sqlite", replacements, cwd=tmp_path, home=tmp_path)
    assert "release 0.1.0" in result.stdout  # db current, before the upgrade
    assert f"stamped 0001) -> {head_revision()}" in result.stdout
    assert (tmp_path / "backups" / "edgefleet.tar.gz").exists()
    for restored in (tmp_path / "srv", data_dir):
        assert (restored / "admin-token").read_text() == "token-of-release-0.1.0\n"
        assert (restored / "artifacts" / "ab" / ("ab" + "0" * 62)).read_bytes() == b"model bytes"
        engine = create_db_engine(f"sqlite:///{restored / 'edgefleet.db'}")
        try:
            assert schema_status(engine).current == head_revision()
            with engine.connect() as connection:
                assert connection.execute(text("SELECT count(*) FROM device")).scalar() == 3
        finally:
            engine.dispose()


@pytest.fixture
def second_postgres_url() -> Iterator[str]:
    from tests.services import fresh_postgres_database

    with fresh_postgres_database() as url:
        yield url


def test_postgresql_scenario(postgres_url: str, second_postgres_url: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "var-lib-edgefleet"
    release_0_1_0_install(data_dir, postgres_url)
    replacements = {
        "postgresql+psycopg://edgefleet:secret@db.internal:5432/edgefleet": postgres_url,
        "postgresql+psycopg://edgefleet:secret@db-new.internal:5432/edgefleet": second_postgres_url,
        "/var/lib/edgefleet": str(data_dir),
        "/var/backups": str(tmp_path / "backups"),
        "/srv/edgefleet": str(tmp_path / "srv"),
    }
    run("postgresql", replacements, cwd=tmp_path, home=tmp_path)
    engine = create_db_engine(second_postgres_url)
    try:
        assert schema_status(engine).current == head_revision()
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM telemetry_window")).scalar() == 9
    finally:
        engine.dispose()
    assert (tmp_path / "srv" / "admin-token").read_text() == "token-of-release-0.1.0\n"


NEW_MODEL = '''

class DeviceNote(SQLModel, table=True):
    """A scratch model of the doc test: what a developer adds."""

    __tablename__ = "device_note"

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=128)
    text: str = Field(default="", max_length=1024)
'''


def test_developer_scenario(tmp_path: Path) -> None:
    """`revision` writes the next migration for a model change (in a copy of the code), `check` then passes."""
    repo = tmp_path / "repo"
    for package in ("cloud", "protocol"):
        shutil.copytree(ROOT / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(ROOT / "pyproject.toml", repo / "pyproject.toml")  # ruff's settings for the new file
    with (repo / "cloud" / "models" / "devices.py").open("a") as models:
        models.write(NEW_MODEL)
    real_versions = sorted(p.name for p in (ROOT / "cloud" / "migrations" / "versions").iterdir())

    result = run("developer", {}, cwd=repo, home=tmp_path)

    written = sorted((repo / "cloud" / "migrations" / "versions").glob("*_add_device_notes.py"))
    assert len(written) == 1, result.stdout
    source = written[0].read_text()
    assert 'op.create_table(\n        "device_note"' in source and "sqlmodel" not in source
    assert f'down_revision: str | None = "{head_revision()}"' in source
    assert written[0].name.startswith(f"{int(head_revision()) + 1:04d}_")
    assert "the models match the migrations" in result.stdout
    lint = subprocess.run([str(BIN / "ruff"), "check", str(written[0])], cwd=repo, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout
    assert sorted(p.name for p in (ROOT / "cloud" / "migrations" / "versions").iterdir()) == real_versions


def test_developer_postgresql_scenario(postgres_url: str, tmp_path: Path) -> None:
    replacements = {"postgresql+psycopg://postgres@127.0.0.1:5432/edgefleet_scratch": postgres_url}
    result = run("developer-postgresql", replacements, cwd=ROOT, home=tmp_path)
    assert "the models match the migrations" in result.stdout
