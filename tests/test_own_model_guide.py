"""docs/own-model.md, run as a user would: every `python` and `sh` block in order, in one directory, against a real
coordinator (embedded broker) and three real agents tagged `fleet=guide` with live inference traffic.

Models the project did not build — an skl2onnx classifier (label + probabilities) and regressor, a PyTorch network
exported with `torch.onnx.export` defaults (external data) and as a `torch.export` program, a TFLite file made with
litert-torch — go through compress → push → deploy → serve → a gated rollout of a new version.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from compression.reference import load_digits_split
from simulators import CoordinatorProcess, FleetConfig, SimulatedFleet
from tests.services import free_port, require_convert_extra, require_module

pytestmark = pytest.mark.e2e

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "own-model.md"
BIN = Path(sys.executable).parent


def guide_blocks() -> list[tuple[str, str]]:
    """The guide's `python` and `sh` blocks in order (`console` blocks are for reading, not run)."""
    return re.findall(r"```(python|sh)\n(.*?)```", GUIDE.read_text(), re.S)


@contextlib.contextmanager
def traffic(fleet: SimulatedFleet) -> Iterator[None]:
    """Held-out digits sent to every agent in the background (whatever model it serves), until the block ends."""
    rows = load_digits_split().x_test
    stopping = threading.Event()

    def run() -> None:
        index = 0
        while not stopping.is_set():
            for agent in fleet.agents:
                index = (index + 1) % len(rows)
                with contextlib.suppress(Exception):  # no model yet, mid-switch, or a model of another shape
                    agent.infer({"input": rows[index : index + 1]})
            stopping.wait(0.01)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopping.set()
        thread.join(10)


def test_every_step_of_the_own_model_guide_works(tmp_path: Path, topic_base: str) -> None:
    require_module("skl2onnx", "the guide converts a scikit-learn model with skl2onnx (the dev extra)")
    require_convert_extra()
    process = CoordinatorProcess(
        tmp_path / "coordinator", topic_base=topic_base, extra_args=("--port", str(free_port()))
    )
    client = process.start()
    config = FleetConfig(
        devices=3,
        data_root=tmp_path / "fleet",
        coordinator_url=client.url,
        api_token=client.token,
        topic_base=topic_base,
        id_prefix="guide",
        tags={"fleet": "guide"},
        http=True,
        telemetry_interval_s=0.5,
    )
    work = tmp_path / "work"
    work.mkdir()
    try:
        with SimulatedFleet(config) as fleet, traffic(fleet):
            env = {
                **os.environ,
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "EDGEFLEET_URL": client.url,
                "EDGEFLEET_TOKEN": client.token or "",
                "EDGEFLEET_CONFIG": str(tmp_path / "cli.toml"),
                "DEVICE_URL": str(fleet.agents[0].inference_url),
                "COLUMNS": "160",
            }
            for number, (kind, body) in enumerate(guide_blocks()):
                script = work / f"step{number:02d}.{'py' if kind == 'python' else 'sh'}"
                script.write_text(body)
                command = (
                    [sys.executable, script.name] if kind == "python" else ["bash", "-euo", "pipefail", script.name]
                )
                done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
                assert done.returncode == 0, (
                    f"step {number} ({kind}) failed:\n{body}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
                )
            running = {a.config.device_id: (a.active_model, a.update_status) for a in fleet.agents}
            assert fleet.wait_for_version("1.0.0", 60), f"the fleet did not end on digits-tflite:1.0.0: {running}"
            assert {a.active_model.name for a in fleet.agents if a.active_model} == {"digits-tflite"}
            rows = np.asarray(load_digits_split().x_test[:3], dtype=np.float32)
            served = fleet.agents[1].infer({"args_0": rows})  # the TFLite file's own tensor names
            assert served["output_0"].shape == (3, 10), "the TFLite model serves a batch of 3"
        rollouts = httpx.get(
            f"{client.url}/api/v1/rollouts", headers={"Authorization": f"Bearer {client.token}"}, timeout=10
        ).json()["data"]
        assert [(r["model_version"], r["status"]) for r in rollouts] == [("1.1.0", "completed")], rollouts
    finally:
        process.stop()
