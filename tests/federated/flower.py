"""A real Flower deployment for tests: one insecure SuperLink and SuperNodes from the Flower venv, on 127.0.0.1.

Every process gets its own `FLWR_HOME` and process group (killed as a group: each spawns a SuperExec), the
`flwr` CLI its own config with one connection, `local`. Runs are started with `flwr run APP local --format
json --run-config FILE.toml` and followed with `flwr ls local --run-id N --format json` (contract §4: the
exit code of `flwr run --stream` says nothing). Also: sample stores written per contract §6 with sqlite3.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from simulators.brokers import free_port
from tests.services import unavailable

ROOT = Path(__file__).resolve().parents[2]
FLOWER_BIN = Path(os.environ.get("EDGEFLEET_FLOWER_BIN_DIR") or ROOT / ".venv-flower" / "bin")
APP_TEMPLATE = ROOT / "federated" / "flowerapp"

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  request_id TEXT NOT NULL, row INTEGER NOT NULL,
  model TEXT NOT NULL, version TEXT NOT NULL, input_name TEXT NOT NULL,
  dtype TEXT NOT NULL, shape TEXT NOT NULL, data BLOB NOT NULL,
  label TEXT, created_at REAL NOT NULL, labelled_at REAL,
  UNIQUE (model, request_id, row)
);
"""


def require_flower() -> Path:
    """The Flower venv's bin directory; skip (fail under CI) when it is not there."""
    if not (FLOWER_BIN / "flower-superlink").is_file():
        unavailable(f"no Flower venv at {FLOWER_BIN.parent} (make .venv-flower): federated tests need flwr 1.42")
    return FLOWER_BIN


def write_store(
    path: Path,
    model: str,
    x: np.ndarray,
    y: np.ndarray | None,
    *,
    prefix: str,
    batch: int = 4,
    version: str = "1.0",
) -> Path:
    """A sample store as the agent writes it: requests of `batch` rows, labelled (`y`) or not (None)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)
        db.execute("PRAGMA user_version = 1")
        now = time.time()
        rows = [
            (
                f"{prefix}-{i // batch}",
                i % batch,
                model,
                version,
                "input",
                str(x.dtype),
                json.dumps(list(x.shape[1:])),
                np.ascontiguousarray(x[i]).tobytes(),
                None if y is None else json.dumps(int(y[i])),
                now,
                None if y is None else now,
            )
            for i in range(len(x))
        ]
        db.executemany(
            "INSERT INTO samples (request_id, row, model, version, input_name, dtype, shape, data, label, "
            "created_at, labelled_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        db.commit()
    return path


def make_run_dir(target: Path, program: bytes) -> Path:
    """The app template plus `trainable.json` (contract §7), as the coordinator prepares a run."""
    import base64
    import hashlib

    shutil.copytree(APP_TEMPLATE, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    document = {
        "format": "torch.export",
        "sha256": hashlib.sha256(program).hexdigest(),
        "program_b64": base64.b64encode(program).decode(),
    }
    (target / "trainable.json").write_text(json.dumps(document))
    return target


def _env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    # Extra packages for the Flower processes only, e.g. dp-accounting for Flower's DP accountant.
    extra = os.environ.get("EDGEFLEET_TEST_FLOWER_PYTHONPATH")
    return {
        **os.environ,
        **({"PYTHONPATH": extra} if extra else {}),
        "PATH": f"{FLOWER_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }


@dataclass
class FlowerCluster:
    """A running SuperLink with SuperNodes, and the `flwr` CLI pointed at it."""

    workdir: Path
    port: int
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    node_ids: dict[str, int] = field(default_factory=dict)  # SuperNode name → Flower node id

    @property
    def cli_home(self) -> Path:
        return self.workdir / "cli"

    def flwr(self, *args: str, timeout: float = 120) -> Any:
        """Run the `flwr` CLI with `--format json`; its parsed output."""
        result = subprocess.run(
            [str(FLOWER_BIN / "flwr"), *args, "--format", "json"],
            env=_env(self.cli_home),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        try:
            return json.loads(result.stdout)
        except ValueError:
            raise AssertionError(
                f"flwr {' '.join(args)} -> {result.returncode}: {result.stdout}{result.stderr}"
            ) from None

    def online(self) -> set[int]:
        """Node ids the SuperLink lists as online."""
        body = self.flwr("supernode", "list", "local")
        return {int(n["node-id"]) for n in body.get("nodes", []) if n.get("status") == "online"}

    def _start(self, name: str, args: Sequence[str], home: Path) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / f"{name}.log").open("wb")
        self.processes[name] = subprocess.Popen(
            args, env=_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def start_superlink(self) -> None:
        self._start(
            "superlink",
            [
                str(FLOWER_BIN / "flower-superlink"),
                "--insecure",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
            ],
            self.workdir / "superlink",
        )
        self.cli_home.mkdir(parents=True, exist_ok=True)
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.flwr_ok():
                return
            time.sleep(0.5)
        raise AssertionError(f"the SuperLink did not come up: {self.log('superlink')}")

    def flwr_ok(self) -> bool:
        try:
            return bool(self.flwr("supernode", "list", "local", timeout=30).get("success"))
        except (AssertionError, subprocess.TimeoutExpired):
            return False

    def start_supernode(self, name: str, node_config: Mapping[str, str], timeout: float = 90) -> int:
        """Start a SuperNode; its node id once the SuperLink lists it online."""
        before = self.online()
        config = " ".join(f'{k}="{v}"' for k, v in node_config.items())
        self._start(
            name,
            [
                str(FLOWER_BIN / "flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--port",
                str(free_port()),
                "--node-config",
                config,
            ],
            self.workdir / name,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            new = self.online() - before - set(self.node_ids.values())
            if new:
                self.node_ids[name] = new.pop()
                return self.node_ids[name]
            time.sleep(1)
        raise AssertionError(f"SuperNode {name} did not come online: {self.log(name)}")

    def log(self, name: str) -> str:
        """The last lines a process wrote."""
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def run(self, app_dir: Path, config: Mapping[str, Any]) -> int:
        """Start a run with this run config; its run id."""
        toml = app_dir.parent / f"{app_dir.name}.run.toml"
        toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
        body = self.flwr("run", str(app_dir), "local", "--run-config", str(toml))
        assert body.get("success"), body
        return int(body["run-id"])

    def wait(self, run_id: int, timeout: float = 600) -> tuple[str, str]:
        """(status, status-details) once the run is finished:*."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.flwr("ls", "local", "--run-id", str(run_id))
            run = body["runs"][0]
            if run["status"].startswith("finished"):
                return run["status"], run.get("status-details", "")
            time.sleep(2)
        raise AssertionError(f"run {run_id} did not finish in {timeout} s: {self.log('superlink')}")

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@contextmanager
def flower_cluster(workdir: Path) -> Iterator[FlowerCluster]:
    """A SuperLink on a free port (SuperNodes are started by the caller); everything stopped afterwards."""
    require_flower()
    cluster = FlowerCluster(workdir=workdir, port=free_port())
    try:
        cluster.start_superlink()
        yield cluster
    finally:
        cluster.stop()
