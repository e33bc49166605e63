"""A real Prometheus scrapes a real coordinator (`edgefleet up`, bearer token) and a real agent's `/metrics`.

The agent is enrolled, serves the digits model in ONNX Runtime and sends a telemetry window through the
coordinator's embedded broker; Prometheus (Debian's `prometheus` package) then answers `/api/v1/query` with
the inferences the agent made and the window the coordinator stored. Skipped when the binary is absent,
except under CI=true where it must be there (`.ci/run` installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from agent import Agent
from cloud.client import ApiClient
from simulators import CoordinatorProcess, FleetConfig, SimulatedFleet
from tests.agent.conftest import install_model, model_spec
from tests.services import free_port

pytestmark = pytest.mark.e2e

PROMETHEUS = Path(shutil.which("prometheus") or "/usr/bin/prometheus")
ROWS = np.random.default_rng(5).random((1, 64), dtype=np.float32)
INFERENCES = 4

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def documented_config(replacements: dict[str, str]) -> str:
    """The scrape configuration of docs/operations.md ("Metrics"), with this test's addresses and interval."""
    match = re.search(r"<!-- prometheus.yml -->\n```yaml\n(.*?)```", DOC.read_text(), re.S)
    assert match, "docs/operations.md lost its prometheus.yml block"
    config = match.group(1)
    for placeholder, value in replacements.items():
        assert placeholder in config, f"the documented prometheus.yml no longer has {placeholder!r}"
        config = config.replace(placeholder, value)
    return config


def _prometheus_binary() -> Path:
    if PROMETHEUS.is_file() and os.access(PROMETHEUS, os.X_OK):
        return PROMETHEUS
    reason = f"no prometheus binary at {PROMETHEUS} (apt-get install prometheus)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must have it (.ci/run)")
    pytest.skip(reason)


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[ApiClient]:
    """`edgefleet up` in its own process with its embedded broker."""
    process = CoordinatorProcess(tmp_path / "coordinator")
    client = process.start()
    try:
        yield client
    finally:
        assert process.stop() == 0, f"coordinator did not shut down cleanly; see {tmp_path / 'coordinator'}"


@pytest.fixture
def agent(coordinator: ApiClient, tmp_path: Path, digits_model_bytes: bytes) -> Iterator[Agent]:
    """One enrolled agent serving digits 1.0 on an ephemeral port, connected to the coordinator's broker."""
    fleet = SimulatedFleet(
        FleetConfig(devices=1, data_root=tmp_path / "fleet", coordinator_url=coordinator.url,
                    api_token=coordinator.token, id_prefix="prom", telemetry_interval_s=3600)
    )  # fmt: skip
    fleet.enrol()
    [member] = fleet.agents
    install_model(member.config.data_dir, model_spec("digits", "1.0", digits_model_bytes), digits_model_bytes)
    device = Agent(member.config)
    device.start()
    try:
        yield device
    finally:
        device.stop()


@pytest.fixture
def prometheus(tmp_path: Path, coordinator: ApiClient, agent: Agent) -> Iterator[str]:
    """Prometheus scraping both every second, on a free loopback port, its data in tmp_path; killed afterwards."""
    binary = _prometheus_binary()
    viewer = coordinator.post_json("/tokens", {"name": "prometheus", "role": "viewer"})["token"]
    token_file = tmp_path / "prometheus-token"
    token_file.write_text(viewer)
    assert agent.inference_url is not None
    config = tmp_path / "prometheus.yml"
    config.write_text(
        documented_config(
            {
                "scrape_interval: 15s": "scrape_interval: 1s\n  scrape_timeout: 1s",
                "/etc/prometheus/edgefleet-token": str(token_file),
                "coordinator.example.org:8000": coordinator.url.removeprefix("http://"),
                "127.0.0.1:8500": agent.inference_url.removeprefix("http://"),
            }
        )
    )
    address = f"127.0.0.1:{free_port()}"
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [str(binary), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address={address}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )  # fmt: skip
    try:
        yield f"http://{address}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def query(prometheus: str, expression: str) -> float | None:
    """The value of an instant query with one series; None while Prometheus has nothing (or is not up yet)."""
    try:
        answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expression}, timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return None
    result = answer.get("data", {}).get("result", [])
    return float(result[0]["value"][1]) if len(result) == 1 else None


def wait_for_value(prometheus: str, expression: str, expected: float, tmp_path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = query(prometheus, expression)
        if seen == expected:
            return
        time.sleep(0.25)
    log = (tmp_path / "prometheus.log").read_text(errors="replace")[-2000:]
    pytest.fail(f"Prometheus: {expression} = {seen}, expected {expected} within {timeout:.0f}s\n{log}")


def test_prometheus_scrapes_the_coordinator_and_the_agent(
    prometheus: str, coordinator: ApiClient, agent: Agent, tmp_path: Path
) -> None:
    device = agent.config.device_id
    for _ in range(INFERENCES):
        agent.infer({"input": ROWS})
    agent.flush_telemetry()  # one window of INFERENCES inferences, through the broker to the coordinator
    deadline = time.monotonic() + 30
    while not coordinator.telemetry(device) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert coordinator.telemetry(device), "the coordinator never stored the agent's window"

    wait_for_value(prometheus, 'up{job="coordinator"}', 1, tmp_path)  # the bearer token was accepted
    wait_for_value(prometheus, 'up{job="agent"}', 1, tmp_path)
    wait_for_value(prometheus, 'edgefleet_agent_inferences_total{model="digits",version="1.0"}', INFERENCES, tmp_path)
    wait_for_value(prometheus, 'edgefleet_agent_inference_latency_seconds_count{model="digits"}', INFERENCES, tmp_path)
    wait_for_value(prometheus, 'edgefleet_ingest_stored_total{channel="telemetry"}', 1, tmp_path)
    wait_for_value(prometheus, 'edgefleet_devices{status="online"}', 1, tmp_path)
    wait_for_value(prometheus, 'edgefleet_devices_by_model{model="digits",version="1.0"}', 1, tmp_path)
    wait_for_value(prometheus, "edgefleet_database_up", 1, tmp_path)
    lag = query(prometheus, "edgefleet_telemetry_ingest_lag_seconds")
    assert lag is not None and 0 <= lag < 120
