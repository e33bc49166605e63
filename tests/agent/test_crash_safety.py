"""Power loss at every update state: the real agent in a subprocess, SIGKILLed on entering a phase.

Each case: a device serving v1 is told to run v2; `simulators.faulty_agent` kills it right after the
chosen phase reached disk; the normal agent then starts on the same data directory. It must serve a
model that passed its health check from its first moment (v1 before the switch, v2 from the trial on),
find a consistent state file, and converge to v2. Real broker (Mosquitto), real HTTP, ONNX Runtime.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from agent import Agent, AgentConfig
from agent.update import UpdateHooks, UpdateState
from compression.reference import shifted_model
from protocol import ModelRef, ModelSpec, UpdatePhase
from simulators.faults import ArtifactFaults, FaultyArtifactServer
from tests.agent.conftest import Observer, install_model, model_spec

pytestmark = pytest.mark.e2e

P = UpdatePhase
ROOT = Path(__file__).resolve().parents[2]
SAMPLE = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(1, 64)
DEVICE = "crash-1"
MAX_TRIAL_BOOTS = 3


class BootRecorder(UpdateHooks):
    """Remembers what the agent served and which state it found at start-up, before any step ran."""

    def __init__(self) -> None:
        self.served: ModelRef | None = None
        self.state: UpdateState | None = None

    def on_boot(self, state: UpdateState, serving: ModelRef | None) -> None:
        self.served, self.state = serving, state


@dataclass
class Device:
    data_dir: Path
    config: Path
    v1: ModelSpec
    v2: ModelSpec
    v2_bytes: bytes
    settings: dict[str, object]

    def run_faulty(self, kill_at: UpdatePhase, *extra: str, timeout: float = 30.0) -> int:
        """Run `simulators.faulty_agent` until it dies; its return code (-9 when SIGKILLed)."""
        command = [sys.executable, "-m", "simulators.faulty_agent", "--config", str(self.config)]
        command += ["--kill-at", kill_at.value, "--timeout", str(timeout - 5), *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode in (-9, 0), f"faulty agent exited {done.returncode}: {done.stderr[-2000:]}"
        return done.returncode

    def start_agent(self, recorder: BootRecorder) -> Agent:
        agent = Agent(AgentConfig(**self.settings), hooks=recorder)  # type: ignore[arg-type]
        agent.start()
        return agent

    def state_on_disk(self) -> dict:
        raw = json.loads((self.data_dir / "update-state.json").read_text())
        assert raw["format_version"] == 1
        UpdateState.model_validate(raw["state"])  # the whole record is valid, not just parseable
        return raw["state"]

    def active_slot(self) -> str:
        return json.loads((self.data_dir / "slots" / "active").read_text())["slot"]


@pytest.fixture
def device(
    tmp_path: Path,
    mosquitto_url: str,
    topic_base: str,
    digits_model_bytes: bytes,
    server: FaultyArtifactServer,
    observer_mosquitto: Observer,
) -> Device:
    """A device serving v1 from slot a, with v2 (a different network) desired (retained) over MQTT."""
    data_dir = tmp_path / DEVICE
    v1 = model_spec("digits", "1.0", digits_model_bytes, url=server.publish("v1.onnx", digits_model_bytes))
    install_model(data_dir, v1, digits_model_bytes, slot="a")
    v2_bytes = shifted_model(digits_model_bytes)
    v2 = model_spec("digits", "2.0", v2_bytes, url=server.publish("v2.onnx", v2_bytes))
    settings: dict[str, object] = {
        "device_id": DEVICE,
        "data_dir": str(data_dir),
        "mqtt_url": mosquitto_url,
        "topic_base": topic_base,
        "http_port": "disabled",
        "telemetry_interval_s": 3600.0,
        "download_timeout_s": 5.0,
        "commit_after_s": 0.5,
        "max_trial_boots": MAX_TRIAL_BOOTS,
    }
    config = tmp_path / "agent.toml"
    config.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items()) + "\n")
    observer_mosquitto.desire(DEVICE, 1, v2)
    return Device(data_dir, config, v1, v2, v2_bytes, settings)


@pytest.fixture
def observer_mosquitto(mosquitto_url: str, topic_base: str) -> Iterator[Observer]:
    from protocol import Topics

    obs = Observer(mosquitto_url, Topics(topic_base))
    yield obs
    obs.close()


def outputs_of(model_bytes: bytes) -> np.ndarray:
    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": SAMPLE})[0]


# Every phase of the update path, and the model a restarted agent must serve at once.
KILL_TABLE = {
    P.DOWNLOADING: "v1",
    P.VERIFYING: "v1",
    P.STAGING: "v1",
    P.LOADING: "v1",
    P.HEALTH_CHECK: "v1",
    P.SHADOW: "v1",
    P.SWITCHING: "v1",  # killed before the slot pointer moved: the switch never happened
    P.COMMITTING: "v2",  # the switch is on disk: v2 serves on trial (it passed its health check)
    P.ACTIVE: "v2",
}


@pytest.mark.parametrize(("phase", "serves"), KILL_TABLE.items(), ids=[p.value for p in KILL_TABLE])
def test_agent_killed_at_every_update_state_serves_a_healthy_model_and_converges(
    device: Device, phase: UpdatePhase, serves: str
) -> None:
    assert device.run_faulty(phase) == -9

    state = device.state_on_disk()
    assert state["phase"] == phase.value, "the kill came right after the phase reached disk"
    assert device.active_slot() == ("b" if serves == "v2" else "a")

    recorder = BootRecorder()
    agent = device.start_agent(recorder)
    try:
        expected = device.v2 if serves == "v2" else device.v1
        assert recorder.served == expected.ref, f"after a kill at {phase.value} the agent served {recorder.served}"
        assert recorder.state is not None and recorder.state.phase is not P.FAILED, recorder.state
        assert agent.wait_for_model("2.0", 30), f"did not converge after a kill at {phase.value}: {agent.update_status}"
        status = agent.update_status
        assert status is not None and status.phase is P.ACTIVE and status.error is None
        np.testing.assert_array_equal(agent.infer({"input": SAMPLE})["probabilities"], outputs_of(device.v2_bytes))
    finally:
        agent.stop()
    assert device.state_on_disk()["phase"] == "active" and device.active_slot() == "b"


def test_agent_killed_mid_download_resumes_with_range(device: Device, server: FaultyArtifactServer) -> None:
    size = len(device.v2_bytes)
    server.set_faults("v2.onnx", ArtifactFaults(delay_s=0.02, chunk_bytes=512))  # slow enough to be cut
    assert device.run_faulty(P.DOWNLOADING, "--after-bytes", str(size // 2)) == -9
    part = device.data_dir / "downloads" / f"{device.v2.artifact.sha256}.part"
    kept = part.stat().st_size
    assert size // 2 <= kept < size

    server.set_faults("v2.onnx", ArtifactFaults())
    agent = device.start_agent(BootRecorder())
    try:
        assert agent.wait_for_model("2.0", 30), f"did not converge: {agent.update_status}"
    finally:
        agent.stop()
    # (The killed agent's request may be recorded last: the server notices the dead socket late.)
    [resumed] = [r for r in server.requests("v2.onnx") if r.range is not None]
    assert resumed.range == f"bytes={kept}-" and resumed.status == 206 and resumed.sent == size - kept
    assert server.served_bytes("v2.onnx") < 2 * size


def test_crash_loop_after_the_switch_rolls_back_to_the_previous_model(
    device: Device, observer_mosquitto: Observer
) -> None:
    # The first run switches and dies at the start of the trial; every later start dies in the trial again.
    for _ in range(1 + MAX_TRIAL_BOOTS):
        assert device.run_faulty(P.COMMITTING) == -9
    assert device.state_on_disk()["boots"] == MAX_TRIAL_BOOTS and device.active_slot() == "b"

    recorder = BootRecorder()
    agent = device.start_agent(recorder)
    try:
        assert recorder.served == device.v1.ref, "one start too many must go back to v1 before serving"
        assert agent.active_model == device.v1.ref
        status = agent.update_status
        assert status is not None and status.phase is P.ROLLED_BACK and status.error is not None
        assert status.error.code.value == "health_check_failed" and "rolled back to digits:1.0" in status.error.message
        reported = observer_mosquitto.reported(
            DEVICE, lambda r: r.update is not None and r.update.phase is P.ROLLED_BACK
        )
        assert reported.active_model == device.v1.ref
    finally:
        agent.stop()
    assert device.active_slot() == "a" and device.state_on_disk()["phase"] == "rolled_back"


def test_active_model_tampered_on_disk_is_never_served_and_the_device_still_converges(device: Device) -> None:
    model = device.data_dir / "slots" / "a" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed: bit rot, or someone editing the file
    model.write_bytes(bytes(data))

    recorder = BootRecorder()
    agent = device.start_agent(recorder)
    try:
        assert recorder.served is None, "the agent served a model file that no longer matches its sha256"
        assert agent.wait_for_model("2.0", 30), f"did not converge: {agent.update_status}"
        np.testing.assert_array_equal(agent.infer({"input": SAMPLE})["probabilities"], outputs_of(device.v2_bytes))
    finally:
        agent.stop()


def test_power_cut_while_writing_a_slot_leaves_a_torn_slot_that_is_rewritten(device: Device) -> None:
    assert device.run_faulty(P.STAGING) == -9
    assert device.state_on_disk()["phase"] == "staging"
    # The power went while slot b was written: its spec.json reached the disk, half of the model file did not.
    slot = device.data_dir / "slots" / "b"
    slot.mkdir(parents=True, exist_ok=True)
    (slot / "spec.json").write_text(device.v2.model_dump_json())
    (slot / "model.onnx").write_bytes(device.v2_bytes[: len(device.v2_bytes) // 2])

    recorder = BootRecorder()
    agent = device.start_agent(recorder)
    try:
        assert recorder.served == device.v1.ref, "v1 serves while the torn slot is rewritten"
        assert agent.wait_for_model("2.0", 30), f"did not converge: {agent.update_status}"
        np.testing.assert_array_equal(agent.infer({"input": SAMPLE})["probabilities"], outputs_of(device.v2_bytes))
    finally:
        agent.stop()
    assert (slot / "model.onnx").read_bytes() == device.v2_bytes
