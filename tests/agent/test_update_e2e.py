"""Real updates end to end: a real broker, artifacts over real HTTP, ONNX Runtime loading the files."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest
from onnx import TensorProto, helper

from agent import NoModelError
from agent.update import StateFile, UpdateState
from compression.reference import shifted_model
from protocol import DeviceEvent, ErrorCode, EventKind, UpdatePhase
from tests.agent.conftest import AgentFactory, ArtifactServer, Observer

pytestmark = pytest.mark.e2e

SAMPLE = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(1, 64)


def reference_outputs(model_bytes: bytes) -> np.ndarray:
    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": SAMPLE})[0]


def nan_on_zeros_model() -> bytes:
    """Takes the digits input but answers input/input: NaN on the warm-up's zeros."""
    node = helper.make_node("Div", ["input", "input"], ["probabilities"])
    graph = helper.make_graph(
        [node],
        "nan",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 64])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def activate_v1(agent_factory: AgentFactory, artifacts: ArtifactServer, observer: Observer, model: bytes):
    agent = agent_factory()
    agent.start()
    v1 = artifacts.model("digits", "1.0", model)
    observer.desire("dev-1", 1, v1)
    assert agent.wait_for_model("1.0", 30), f"agent did not activate 1.0: {agent.update_status}"
    return agent, v1


def test_agent_activates_a_retained_desired_state_and_reports_it(
    make_agent: AgentFactory, artifacts: ArtifactServer, observer: Observer, digits_model_bytes: bytes
) -> None:
    v1 = artifacts.model("digits", "1.0", digits_model_bytes)
    observer.desire("dev-1", 1, v1)  # retained before the device is even running
    agent = make_agent()
    with pytest.raises(NoModelError):
        agent.infer({"input": SAMPLE})
    agent.start()

    assert agent.wait_for_model("1.0", 30), f"not active: {agent.update_status}"
    reported = observer.reported(
        "dev-1", lambda r: r.active_model == v1.ref and r.update is not None and r.update.phase is UpdatePhase.ACTIVE
    )
    assert reported.update.generation == 1 and reported.update.error is None
    assert "onnxruntime" in reported.capabilities.runtimes
    kinds = [e.kind for e in observer.all(observer.topics.events("dev-1"), DeviceEvent)]
    assert EventKind.UPDATE_STARTED in kinds and EventKind.UPDATE_ACTIVATED in kinds
    observer.event("dev-1", lambda e: e.kind is EventKind.UPDATE_ACTIVATED and e.generation == 1)

    np.testing.assert_array_equal(
        agent.infer({"input": SAMPLE})["probabilities"], reference_outputs(digits_model_bytes)
    )
    state = json.loads((agent.config.data_dir / "update-state.json").read_text())
    assert state["format_version"] == 1 and state["state"]["phase"] == "active"
    assert (agent.config.data_dir / "slots" / "a" / "model.onnx").read_bytes() == digits_model_bytes


def test_update_to_a_second_version_switches_slots_and_outputs(
    make_agent: AgentFactory, artifacts: ArtifactServer, observer: Observer, digits_model_bytes: bytes
) -> None:
    agent, _ = activate_v1(make_agent, artifacts, observer, digits_model_bytes)
    v2_bytes = shifted_model(digits_model_bytes)
    v2 = artifacts.model("digits", "2.0", v2_bytes)
    observer.desire("dev-1", 2, v2)
    assert agent.wait_for_model("2.0", 30), f"not active: {agent.update_status}"
    np.testing.assert_array_equal(agent.infer({"input": SAMPLE})["probabilities"], reference_outputs(v2_bytes))
    assert json.loads((agent.config.data_dir / "slots" / "active").read_text())["slot"] == "b"
    observer.reported("dev-1", lambda r: r.active_model == v2.ref)


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        ("wrong_digest", ErrorCode.DIGEST_MISMATCH),
        ("not_onnx", ErrorCode.INVALID_MODEL),
        ("nan_on_warm_up", ErrorCode.WARMUP_FAILED),
        ("missing_file", ErrorCode.DOWNLOAD_FAILED),
    ],
)
def test_refused_update_keeps_the_previous_model_serving(
    make_agent: AgentFactory,
    artifacts: ArtifactServer,
    observer: Observer,
    digits_model_bytes: bytes,
    bad: str,
    code: ErrorCode,
) -> None:
    agent, v1 = activate_v1(make_agent, artifacts, observer, digits_model_bytes)
    if bad == "wrong_digest":
        v2 = artifacts.model("digits", "2.0", shifted_model(digits_model_bytes), declared_sha256="0" * 64)
    elif bad == "not_onnx":
        v2 = artifacts.model("digits", "2.0", b"this is not an ONNX model, just bytes")
    elif bad == "nan_on_warm_up":
        v2 = artifacts.model("digits", "2.0", nan_on_zeros_model())
    else:
        v2 = artifacts.model("digits", "2.0", b"gone")
        (artifacts.root / "digits-2.0.onnx").unlink()
    observer.desire("dev-1", 2, v2)

    failed = observer.event("dev-1", lambda e: e.kind is EventKind.UPDATE_FAILED and e.generation == 2)
    assert failed.error.code is code
    reported = observer.reported("dev-1", lambda r: r.update is not None and r.update.phase is UpdatePhase.FAILED)
    assert reported.update.error.code is code and reported.update.error.message
    assert reported.active_model == v1.ref
    assert agent.active_model == v1.ref
    np.testing.assert_array_equal(
        agent.infer({"input": SAMPLE})["probabilities"], reference_outputs(digits_model_bytes)
    )
    assert not list((agent.config.data_dir / "downloads").glob("*.part")) or code is not ErrorCode.DIGEST_MISMATCH


def test_failed_generation_is_not_retried_when_redelivered(
    make_agent: AgentFactory, artifacts: ArtifactServer, observer: Observer, digits_model_bytes: bytes
) -> None:
    agent = make_agent()
    agent.start()
    bad = artifacts.model("digits", "1.0", b"not a model")
    observer.desire("dev-1", 1, bad)
    observer.event("dev-1", lambda e: e.kind is EventKind.UPDATE_FAILED)
    good = artifacts.model("digits", "1.0", digits_model_bytes)
    observer.desire("dev-1", 1, good)  # same generation again: already decided
    observer.desire("dev-1", 2, good)  # a newer generation: a fresh attempt
    assert agent.wait_for_model("1.0", 30)
    observer.event("dev-1", lambda e: e.kind is EventKind.UPDATE_ACTIVATED and e.generation == 2)
    started = [
        e.generation
        for e in observer.all(observer.topics.events("dev-1"), DeviceEvent)
        if e.kind is EventKind.UPDATE_STARTED
    ]
    assert started == [1, 2]


def test_restarted_agent_serves_its_active_slot_before_connecting(
    make_agent: AgentFactory, artifacts: ArtifactServer, observer: Observer, digits_model_bytes: bytes
) -> None:
    agent, v1 = activate_v1(make_agent, artifacts, observer, digits_model_bytes)
    agent.stop()
    observer.reported("dev-1", lambda r: r.status.value == "offline" and r.active_model == v1.ref)
    again = make_agent(mqtt_url="mqtt://127.0.0.1:9")  # nothing listens there: no broker needed to serve
    again.start()
    assert again.active_model == v1.ref
    np.testing.assert_array_equal(
        again.infer({"input": SAMPLE})["probabilities"], reference_outputs(digits_model_bytes)
    )


def test_update_interrupted_by_power_loss_is_restarted_from_download(
    make_agent: AgentFactory, artifacts: ArtifactServer, observer: Observer, digits_model_bytes: bytes
) -> None:
    agent, v1 = activate_v1(make_agent, artifacts, observer, digits_model_bytes)
    agent.stop()
    v2 = artifacts.model("digits", "2.0", shifted_model(digits_model_bytes))
    # The state file as a power loss in the middle of staging generation 2 leaves it.
    StateFile(agent.config.data_dir / "update-state.json").save(
        UpdateState(generation=2, phase=UpdatePhase.STAGING, target=v2, slot="b")
    )
    again = make_agent()
    again.start()
    assert again.active_model == v1.ref or again.active_model == v2.ref
    assert again.wait_for_model("2.0", 30), f"not resumed: {again.update_status}"
    assert again.update_status is not None and again.update_status.phase is UpdatePhase.ACTIVE


def test_newer_generation_supersedes_a_running_update(
    make_agent: AgentFactory, artifacts: ArtifactServer, observer: Observer, digits_model_bytes: bytes
) -> None:
    agent = make_agent()
    agent.start()
    v1 = artifacts.model("digits", "1.0", digits_model_bytes)
    v2 = artifacts.model("digits", "2.0", shifted_model(digits_model_bytes))
    observer.desire("dev-1", 1, v1)
    observer.desire("dev-1", 2, v2)
    assert agent.wait_for_model("2.0", 30), f"not active: {agent.update_status}"
    status = agent.update_status
    assert status is not None and status.generation == 2 and status.phase is UpdatePhase.ACTIVE
