"""Run a coordinator the way an operator would: `edgefleet up` as a process, talked to through `cloud.client`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from cloud.client import ApiClient


class CoordinatorError(RuntimeError):
    """The coordinator could not be started; the message says why."""


class CoordinatorProcess:
    """`edgefleet up` in a subprocess with its own data directory; the way the demo and e2e tests run it."""

    def __init__(
        self,
        data_dir: Path,
        *,
        mqtt_url: str | None = None,
        database_url: str | None = None,
        topic_base: str | None = None,
        extra_args: tuple[str, ...] = (),
        startup_timeout: float = 60.0,
        federated: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """`federated`: run with `--federated` and a SuperLink on a free port (kept in its data dir); `env`: more
        environment (settings such as EDGEFLEET_ALERT_TICK_S)."""
        self.data_dir = data_dir
        self.mqtt_url = mqtt_url
        self.database_url = database_url
        self.topic_base = topic_base
        self.extra_args = extra_args
        self.startup_timeout = startup_timeout
        self.federated = federated
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.token = ""

    def command(self) -> list[str]:
        """The `edgefleet up` command line for this coordinator."""
        cmd = [str(_console_script("edgefleet")), "up", "--data-dir", str(self.data_dir), "--port", "0"]
        if self.mqtt_url:
            cmd += ["--mqtt-url", self.mqtt_url]
        if self.database_url:
            cmd += ["--database-url", self.database_url]
        if self.federated:
            cmd += ["--federated", "--superlink-port", "0"]
        return [*cmd, *self.extra_args]

    def start(self) -> ApiClient:
        """Start the coordinator and wait until it answers `/healthz`."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        info_file = self.data_dir / "coordinator.json"
        info_file.unlink(missing_ok=True)
        env = dict(os.environ, EDGEFLEET_CONFIG=str(self.data_dir / "cli.toml"), **self.env)
        if self.topic_base:
            env["EDGEFLEET_TOPIC_BASE"] = self.topic_base
        log = (self.data_dir / "coordinator.log").open("ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CoordinatorError(f"coordinator exited with {self.proc.returncode}; see {log.name}")
            if info_file.exists() and self._healthy(info_file):
                return self.client()
            time.sleep(0.1)
        self.stop()
        raise CoordinatorError(f"coordinator did not become healthy in {self.startup_timeout:.0f}s; see {log.name}")

    def _healthy(self, info_file: Path) -> bool:
        try:
            info = json.loads(info_file.read_text())
            self.url = str(info["url"]).rstrip("/")
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except (ValueError, KeyError, OSError, httpx.HTTPError):
            return False

    def client(self) -> ApiClient:
        """A client with the admin token this coordinator created."""
        self.token = (self.data_dir / "admin-token").read_text().strip()
        return ApiClient(self.url, self.token)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not stop in time. Returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _console_script(name: str) -> Path:
    """A console script installed beside the running interpreter (the project's venv)."""
    candidate = Path(sys.executable).parent / name
    if not candidate.exists():
        raise CoordinatorError(f"{name} is not installed beside {sys.executable}; run `make install`")
    return candidate
