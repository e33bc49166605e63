"""`edgefleet-agent` as a real subprocess: starts, serves, and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.cli import main
from agent.config import load_config
from tests.agent.conftest import install_model, model_spec
from tests.services import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """`main` configures the root logger (a daemon owns its process); put it back for the other tests."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def agent_command() -> list[str]:
    script = Path(sys.executable).parent / "edgefleet-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent.cli"]


@pytest.mark.e2e
def test_run_serves_and_stops_on_sigterm(tmp_path: Path, mosquitto_url: str, digits_model_bytes: bytes) -> None:
    install_model(tmp_path / "data", model_spec("digits", "1.0", digits_model_bytes), digits_model_bytes)
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "cli-1"\ndata_dir = "data"\nmqtt_url = "{mosquitto_url}"\n'
        f'topic_base = "t{os.getpid()}/edgefleet/v1"\nhttp_port = {port}\n[tags]\nsite = "lab"\n'
    )
    proc = subprocess.Popen(
        [*agent_command(), "run", "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.1)
        else:
            pytest.fail("the agent did not become ready within 20s")
        request = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
        response = httpx.post(f"{url}/v2/models/digits/infer", json=request, timeout=5)
        assert response.status_code == 200 and response.json()["outputs"][0]["shape"] == [1, 10]
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    messages = [line["msg"] for line in lines]
    assert any("started" in m for m in messages) and any("stopped" in m for m in messages)


def test_init_prints_a_config_that_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "--device-id", "cam-7", "--coordinator", "http://coordinator:8000"]) == 0
    path = tmp_path / "agent.toml"
    path.write_text(capsys.readouterr().out)
    config = load_config(path, env={})
    assert config.device_id == "cam-7" and config.coordinator_url == "http://coordinator:8000"
    assert config.data_dir == tmp_path / "edgefleet-agent-data"


def test_run_with_a_bad_config_exits_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "bad id!"\ndata_dir = "d"\nmqtt_url = "mqtt://127.0.0.1:1"\n')
    assert main(["run", "--config", str(path)]) == 2
    assert "device_id" in capsys.readouterr().err


def test_help_describes_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "run" in out and "init" in out
