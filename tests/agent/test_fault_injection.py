"""Faulty downloads and faulty models against the real agent: every device ends serving a healthy model.

Artifacts come from `simulators.faults.FaultyArtifactServer` (real HTTP on 127.0.0.1), models from
`simulators.faults` (built on the reference digits classifier); the broker is a real Mosquitto.
"""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import onnx
import onnxruntime
import pytest

from agent import Agent, NoModelError
from compression.reference import load_digits_split
from protocol import ErrorCode, EventKind, ModelSpec, UpdatePhase
from simulators.faults import (
    ArtifactFaults,
    FaultyArtifactServer,
    nan_model,
    nan_on_live_input_model,
    shifted_model,
    slow_model,
)
from tests.agent.conftest import AgentFactory, Observer, model_spec

pytestmark = pytest.mark.e2e

P = UpdatePhase
SAMPLE = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(1, 64)


@pytest.fixture
def broker_url(mosquitto_url: str) -> str:
    """One broker is enough here: the broker contract is tested elsewhere; these tests are about faults."""
    return mosquitto_url


def outputs_of(model_bytes: bytes, x: np.ndarray = SAMPLE) -> np.ndarray:
    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def publish(server: FaultyArtifactServer, version: str, data: bytes, faults: ArtifactFaults | None = None) -> ModelSpec:
    return model_spec("digits", version, data, url=server.publish(f"digits-{version}.onnx", data, faults))


def serving_v1(
    make_agent: AgentFactory, server: FaultyArtifactServer, observer: Observer, model: bytes, **settings: object
) -> tuple[Agent, ModelSpec]:
    agent = make_agent(**settings)
    agent.start()
    v1 = publish(server, "1.0", model)
    observer.desire("dev-1", 1, v1)
    deadline = time.monotonic() + 30
    while not agent.wait_for_model("1.0", 0.05):  # live requests let a trial commit early when configured so
        assert time.monotonic() < deadline, f"v1 not active: {agent.update_status}"
        with contextlib.suppress(NoModelError):
            agent.infer({"input": SAMPLE})
    return agent, v1


def identical_copy(model_bytes: bytes) -> bytes:
    """The same network under another digest (a rebuild that changes nothing)."""
    model = onnx.load_from_string(model_bytes)
    model.doc_string = "rebuilt, same weights"
    return model.SerializeToString()


def settles(agent: Agent, generation: int, timeout: float = 30.0) -> UpdatePhase:
    """Wait until the update of `generation` is no longer in progress; its final phase."""
    done = {P.ACTIVE, P.FAILED, P.ROLLED_BACK}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = agent.update_status
        if status is not None and status.generation == generation and status.phase in done:
            return status.phase
        time.sleep(0.05)
    raise AssertionError(f"generation {generation} did not settle: {agent.update_status}")


# -- downloads ----------------------------------------------------------------------------------------------


def test_connection_dropped_mid_download_resumes_with_range(
    make_agent: AgentFactory, server: FaultyArtifactServer, observer: Observer, digits_model_bytes: bytes
) -> None:
    agent, _ = serving_v1(make_agent, server, observer, digits_model_bytes)
    v2_bytes = shifted_model(digits_model_bytes)
    cut = len(v2_bytes) // 3
    v2 = publish(server, "2.0", v2_bytes, ArtifactFaults(drop_after=cut, chunk_bytes=1024))
    observer.desire("dev-1", 2, v2)
    assert agent.wait_for_model("2.0", 30), f"not active: {agent.update_status}"
    first, resumed = server.requests("digits-2.0.onnx")
    assert first.sent == cut and first.range is None
    assert resumed.status == 206 and resumed.range == f"bytes={cut}-"
    assert server.served_bytes("digits-2.0.onnx") < 2 * len(v2_bytes)


def test_server_ignoring_range_after_a_drop_is_downloaded_again_from_the_start(
    make_agent: AgentFactory, server: FaultyArtifactServer, observer: Observer, digits_model_bytes: bytes
) -> None:
    agent, _ = serving_v1(make_agent, server, observer, digits_model_bytes)
    v2_bytes = shifted_model(digits_model_bytes)
    faults = ArtifactFaults(drop_after=len(v2_bytes) // 2, chunk_bytes=1024, ignore_range=True)
    observer.desire("dev-1", 2, publish(server, "2.0", v2_bytes, faults))
    assert agent.wait_for_model("2.0", 30), f"not active: {agent.update_status}"
    np.testing.assert_array_equal(agent.infer({"input": SAMPLE})["probabilities"], outputs_of(v2_bytes))
    assert [r.status for r in server.requests("digits-2.0.onnx")] == [200, 200]


def test_truncated_artifact_fails_the_update_and_keeps_the_previous_model(
    make_agent: AgentFactory, server: FaultyArtifactServer, observer: Observer, digits_model_bytes: bytes
) -> None:
    agent, v1 = serving_v1(make_agent, server, observer, digits_model_bytes, download_attempts=2)
    v2_bytes = shifted_model(digits_model_bytes)
    observer.desire("dev-1", 2, publish(server, "2.0", v2_bytes, ArtifactFaults(truncate_to=len(v2_bytes) // 2)))
    failed = observer.event("dev-1", lambda e: e.kind is EventKind.UPDATE_FAILED and e.generation == 2)
    assert failed.error.code is ErrorCode.DOWNLOAD_FAILED and failed.error.retryable
    assert agent.active_model == v1.ref
    # The server is fixed; the next generation converges.
    server.set_faults("digits-2.0.onnx", ArtifactFaults())
    observer.desire("dev-1", 3, publish(server, "2.0", v2_bytes))
    assert agent.wait_for_model("2.0", 30), f"not active: {agent.update_status}"


def test_byte_corrupted_once_in_transit_is_downloaded_again_and_activated(
    make_agent: AgentFactory, server: FaultyArtifactServer, observer: Observer, digits_model_bytes: bytes
) -> None:
    agent, _ = serving_v1(make_agent, server, observer, digits_model_bytes)
    v2_bytes = shifted_model(digits_model_bytes)
    observer.desire("dev-1", 2, publish(server, "2.0", v2_bytes, ArtifactFaults(corrupt_at=100)))
    assert agent.wait_for_model("2.0", 30), f"not active: {agent.update_status}"
    assert len(server.requests("digits-2.0.onnx")) == 2


def test_artifact_corrupted_on_every_download_is_refused_and_the_previous_model_keeps_serving(
    make_agent: AgentFactory, server: FaultyArtifactServer, observer: Observer, digits_model_bytes: bytes
) -> None:
    agent, v1 = serving_v1(make_agent, server, observer, digits_model_bytes)
    v2_bytes = shifted_model(digits_model_bytes)
    observer.desire("dev-1", 2, publish(server, "2.0", v2_bytes, ArtifactFaults(corrupt_at=100, corrupt_times=-1)))
    failed = observer.event("dev-1", lambda e: e.kind is EventKind.UPDATE_FAILED and e.generation == 2)
    assert failed.error.code is ErrorCode.DIGEST_MISMATCH and not failed.error.retryable
    assert agent.active_model == v1.ref
    np.testing.assert_array_equal(agent.infer({"input": SAMPLE})["probabilities"], outputs_of(digits_model_bytes))
    assert not list((agent.config.data_dir / "downloads").glob("*.part")), "bad bytes must not be resumed"


def test_endless_data_attack_is_cut_at_the_declared_size_and_v1_keeps_serving(
    make_agent: AgentFactory, server: FaultyArtifactServer, observer: Observer, digits_model_bytes: bytes
) -> None:
    agent, v1 = serving_v1(make_agent, server, observer, digits_model_bytes)
    v2_bytes = shifted_model(digits_model_bytes)
    observer.desire("dev-1", 2, publish(server, "2.0", v2_bytes, ArtifactFaults(endless=True, chunk_bytes=65536)))
    failed = observer.event("dev-1", lambda e: e.kind is EventKind.UPDATE_FAILED and e.generation == 2)
    assert failed.error.code is ErrorCode.ARTIFACT_SIZE_MISMATCH
    assert agent.active_model == v1.ref
    (request,) = server.requests("digits-2.0.onnx")
    # The agent hung up shortly after the declared size: at most what the socket buffers held, not the 1 GiB.
    assert request.sent < len(v2_bytes) + 16 * 1024 * 1024
    assert not list((agent.config.data_dir / "downloads").glob("*.part"))


def test_slow_retrieval_attack_is_cut_at_the_minimum_rate_and_v1_keeps_serving(
    make_agent: AgentFactory, server: FaultyArtifactServer, observer: Observer, digits_model_bytes: bytes
) -> None:
    # A trickle that never trips the per-read timeout (a chunk every 50 ms against 2 s) but would take minutes.
    agent, v1 = serving_v1(
        make_agent,
        server,
        observer,
        digits_model_bytes,
        download_attempts=2,
        download_timeout_s=2.0,
        download_min_rate_bps=65536,
    )
    v2_bytes = shifted_model(digits_model_bytes)
    started = time.monotonic()
    observer.desire("dev-1", 2, publish(server, "2.0", v2_bytes, ArtifactFaults(delay_s=0.05, chunk_bytes=64)))
    failed = observer.event("dev-1", lambda e: e.kind is EventKind.UPDATE_FAILED and e.generation == 2)
    assert failed.error.code is ErrorCode.DOWNLOAD_FAILED and "minimum rate" in failed.error.message
    assert time.monotonic() - started < 20
    assert agent.active_model == v1.ref
    assert sum(r.sent for r in server.requests("digits-2.0.onnx")) < len(v2_bytes)


# -- health check -------------------------------------------------------------------------------------------


def test_model_answering_nan_fails_its_health_check_and_v1_keeps_serving(
    make_agent: AgentFactory, server: FaultyArtifactServer, observer: Observer, digits_model_bytes: bytes
) -> None:
    agent, v1 = serving_v1(make_agent, server, observer, digits_model_bytes)
    observer.desire("dev-1", 2, publish(server, "2.0", nan_model(digits_model_bytes)))
    reported = observer.reported("dev-1", lambda r: r.update is not None and r.update.phase is P.FAILED)
    assert reported.update.error.code is ErrorCode.WARMUP_FAILED and "not finite" in reported.update.error.message
    assert reported.active_model == v1.ref and agent.active_model == v1.ref


def test_trial_model_answering_nan_on_live_traffic_is_rolled_back(
    make_agent: AgentFactory, server: FaultyArtifactServer, observer: Observer, digits_model_bytes: bytes
) -> None:
    agent, v1 = serving_v1(
        make_agent, server, observer, digits_model_bytes, commit_after_s=30.0, commit_after_inferences=3
    )
    v2 = publish(server, "2.0", nan_on_live_input_model(digits_model_bytes))
    observer.desire("dev-1", 2, v2)
    observer.reported(
        "dev-1", lambda r: r.update is not None and r.update.generation == 2 and r.update.phase is P.COMMITTING
    )
    assert agent.active_model == v2.ref  # passed the warm-up on zeros: switched, on trial
    agent.infer({"input": SAMPLE})  # the first live request answers NaN
    assert settles(agent, 2) is P.ROLLED_BACK
    status = agent.update_status
    assert status is not None and status.error is not None and status.error.code is ErrorCode.HEALTH_CHECK_FAILED
    assert "NaN" in status.error.message
    assert agent.active_model == v1.ref
    np.testing.assert_array_equal(agent.infer({"input": SAMPLE})["probabilities"], outputs_of(digits_model_bytes))
    observer.reported("dev-1", lambda r: r.update is not None and r.update.phase is P.ROLLED_BACK)


# -- shadow run ---------------------------------------------------------------------------------------------


class Traffic:
    """Live requests on the agent from a background thread; records that every answer came from v1."""

    def __init__(self, agent: Agent, expected: bytes) -> None:
        self._agent = agent
        x = load_digits_split().x_test[:32]
        self._rows = [x[i : i + 1] for i in range(len(x))]
        self._expected = [outputs_of(expected, row) for row in self._rows]
        self.answers = 0
        self.wrong = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            row = i % len(self._rows)
            out = self._agent.infer({"input": self._rows[row]})["probabilities"]
            if self._agent.active_model is not None and self._agent.active_model.version == "1.0":
                self.wrong += int(not np.array_equal(out, self._expected[row]))
            self.answers += 1
            i += 1
            self._stop.wait(0.002)


SHADOW = {"shadow_inferences": 20, "shadow_max_disagreement": 0.05, "shadow_timeout_s": 20.0}


def test_shadow_run_refuses_a_model_with_shifted_outputs_and_callers_keep_v1_answers(
    make_agent: AgentFactory, server: FaultyArtifactServer, observer: Observer, digits_model_bytes: bytes
) -> None:
    agent, v1 = serving_v1(make_agent, server, observer, digits_model_bytes, **SHADOW)
    with Traffic(agent, digits_model_bytes) as traffic:
        observer.desire("dev-1", 2, publish(server, "2.0", shifted_model(digits_model_bytes)))
        assert settles(agent, 2) is P.FAILED
    status = agent.update_status
    assert status is not None and status.error is not None and status.error.code is ErrorCode.HEALTH_CHECK_FAILED
    assert "shadow run" in status.error.message and "disagrees" in status.error.message
    assert agent.active_model == v1.ref
    assert traffic.answers >= 20 and traffic.wrong == 0, "callers must get the serving model's answers"


def test_shadow_run_passes_an_identical_model(
    make_agent: AgentFactory, server: FaultyArtifactServer, observer: Observer, digits_model_bytes: bytes
) -> None:
    agent, _ = serving_v1(make_agent, server, observer, digits_model_bytes, shadow_max_abs_diff=1e-6, **SHADOW)
    with Traffic(agent, digits_model_bytes):
        observer.desire("dev-1", 2, publish(server, "2.0", identical_copy(digits_model_bytes)))
        assert settles(agent, 2) is P.ACTIVE, agent.update_status
    assert agent.active_model is not None and agent.active_model.version == "2.0"


def test_shadow_run_refuses_a_much_slower_model(
    make_agent: AgentFactory, server: FaultyArtifactServer, observer: Observer, digits_model_bytes: bytes
) -> None:
    agent, v1 = serving_v1(make_agent, server, observer, digits_model_bytes, shadow_max_latency_ratio=20.0, **SHADOW)
    with Traffic(agent, digits_model_bytes):
        observer.desire("dev-1", 2, publish(server, "2.0", slow_model(digits_model_bytes)))
        assert settles(agent, 2) is P.FAILED
    status = agent.update_status
    assert status is not None and status.error is not None and "latency" in status.error.message
    assert agent.active_model == v1.ref


@pytest.mark.parametrize(("on_timeout", "phase"), [("pass", P.ACTIVE), ("fail", P.FAILED)])
def test_shadow_run_without_traffic_ends_at_its_timeout(
    make_agent: AgentFactory,
    server: FaultyArtifactServer,
    observer: Observer,
    digits_model_bytes: bytes,
    on_timeout: str,
    phase: UpdatePhase,
) -> None:
    settings = {**SHADOW, "shadow_timeout_s": 0.5, "shadow_on_timeout": on_timeout}
    agent, _ = serving_v1(make_agent, server, observer, digits_model_bytes, **settings)
    observer.desire("dev-1", 2, publish(server, "2.0", identical_copy(digits_model_bytes)))
    assert settles(agent, 2) is phase
    if phase is P.FAILED:
        status = agent.update_status
        assert status is not None and status.error is not None and "0 of 20 live requests" in status.error.message
