"""Talk to a coordinator the way an operator's script would: its REST API, and `edgefleet up` as a process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


class CoordinatorError(RuntimeError):
    """The coordinator refused a request or could not be started; the message says why."""


@dataclass
class CoordinatorClient:
    """A thin client of the coordinator's `/api/v1` (reads open, writes with the admin token)."""

    url: str
    token: str | None = None
    timeout: float = 30.0

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            response = httpx.request(method, f"{self.url}{path}", headers=headers, timeout=self.timeout, **kwargs)
        except httpx.HTTPError as exc:
            raise CoordinatorError(f"{method} {path}: {exc}") from exc
        if response.status_code >= 400:
            raise CoordinatorError(f"{method} {path}: HTTP {response.status_code}: {response.text[:500]}")
        return response.json() if response.content else None

    def info(self) -> dict[str, Any]:
        """Coordinator version, MQTT URL and topic base."""
        return dict(self._request("GET", "/api/v1/info"))

    def push_model(self, path: Path, *, name: str, version: str, inputs: str | None = None) -> dict[str, Any]:
        """Upload a model file as `name:version` (`inputs`: JSON tensor specs, else derived by the registry)."""
        data = {"version": version} | ({"inputs": inputs} if inputs else {})
        with path.open("rb") as fh:
            files = {"file": (path.name, fh, "application/octet-stream")}
            return dict(self._request("POST", f"/api/v1/models/{name}/versions", data=data, files=files))

    def deploy(
        self, *, model: str, version: str, tags: dict[str, str] | None = None, device_ids: list[str] | None = None
    ) -> dict[str, Any]:
        """Deploy `model:version` to devices chosen by tags or ids."""
        target: dict[str, Any] = {"tags": tags} if tags else {"device_ids": device_ids or []}
        body = {"model": model, "version": version, "target": target}
        return dict(self._request("POST", "/api/v1/deployments", json=body))

    def deployment(self, deployment_id: str | int) -> dict[str, Any]:
        """One deployment with its per-device progress."""
        return dict(self._request("GET", f"/api/v1/deployments/{deployment_id}"))

    def devices(self) -> list[dict[str, Any]]:
        """Every known device with its reported state."""
        body = self._request("GET", "/api/v1/devices")
        return list(body["data"] if isinstance(body, dict) else body)

    def telemetry(self, device_id: str) -> list[dict[str, Any]]:
        """The telemetry windows the coordinator stored for one device."""
        body = self._request("GET", f"/api/v1/devices/{device_id}/telemetry")
        return list(body["data"] if isinstance(body, dict) else body)

    def stats(self) -> dict[str, Any]:
        """The coordinator's MQTT ingest counters."""
        return dict(self._request("GET", "/api/v1/stats"))

    def fleet_summary(self) -> dict[str, Any]:
        """Per-device versions, inference counts and latency percentiles."""
        return dict(self._request("GET", "/api/v1/fleet/summary"))


class CoordinatorProcess:
    """`edgefleet up` in a subprocess with its own data directory; the way the demo and e2e tests run it."""

    def __init__(
        self,
        data_dir: Path,
        *,
        mqtt_url: str | None = None,
        database_url: str | None = None,
        topic_base: str | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.data_dir = data_dir
        self.mqtt_url = mqtt_url
        self.database_url = database_url
        self.topic_base = topic_base
        self.startup_timeout = startup_timeout
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
        return cmd

    def start(self) -> CoordinatorClient:
        """Start the coordinator and wait until it answers `/healthz`."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        info_file = self.data_dir / "coordinator.json"
        info_file.unlink(missing_ok=True)
        env = dict(os.environ, EDGEFLEET_CONFIG=str(self.data_dir / "cli.toml"))
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

    def client(self) -> CoordinatorClient:
        """A client with the admin token this coordinator created."""
        self.token = (self.data_dir / "admin-token").read_text().strip()
        return CoordinatorClient(self.url, self.token)

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
