"""Telemetry windows: counts equal inferences, `seq` strictly increasing and never reused across restarts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent import InferenceInputError
from agent.telemetry import SeqCounter, TelemetryRecorder, build_window, predicted_classes
from protocol import ModelRef, TelemetryWindow
from tests.agent.conftest import AgentFactory, Observer, install_model, model_spec

ROWS = np.random.default_rng(3).random((4, 64), dtype=np.float32)
REF = ModelRef(name="digits", version="1.0", sha256="a" * 64)


@pytest.mark.e2e
def test_telemetry_counts_inferences_and_seq_survives_restart(
    make_agent: AgentFactory, observer: Observer, digits_model_bytes: bytes, tmp_path: Path
) -> None:
    spec = model_spec("digits", "1.0", digits_model_bytes)
    data_dir = tmp_path / "agents" / "dev-1"
    install_model(data_dir, spec, digits_model_bytes)
    agent = make_agent()
    agent.start()
    observer.event("dev-1", lambda e: e.kind.value == "agent.started")
    agent.flush_telemetry()  # nothing happened yet: nothing is sent

    predicted = []
    for _ in range(5):
        predicted += list(np.argmax(agent.infer({"input": ROWS})["probabilities"], axis=1))
    for _ in range(2):
        with pytest.raises(InferenceInputError):
            agent.infer({"input": ROWS.astype(np.float64)})
    agent.flush_telemetry()
    first = observer.wait_for(observer.topics.telemetry("dev-1"), TelemetryWindow, lambda w: True)
    assert first.inference_count == 7 and first.error_count == 2
    assert first.model == spec.ref
    assert sum(first.latency_histogram) == 7 and first.latency is not None and first.latency.p50_ms > 0
    assert first.class_counts == {str(c): predicted.count(c) for c in set(predicted)}

    agent.infer({"input": ROWS[:1]})
    agent.stop()  # stopping flushes the open window
    second = observer.wait_for(observer.topics.telemetry("dev-1"), TelemetryWindow, lambda w: w.seq != first.seq)
    assert second.seq > first.seq and second.inference_count == 1
    assert agent.telemetry_sent_seqs == [first.seq, second.seq]

    again = make_agent()
    again.start()
    again.infer({"input": ROWS[:2]})
    again.flush_telemetry()
    third = observer.wait_for(
        observer.topics.telemetry("dev-1"), TelemetryWindow, lambda w: w.seq not in (first.seq, second.seq)
    )
    assert third.seq > second.seq and third.inference_count == 1
    seqs = [w.seq for w in observer.telemetry("dev-1")]
    assert seqs == sorted(set(seqs)), f"seq reused or out of order: {seqs}"


@pytest.mark.e2e
def test_windows_are_published_every_interval(
    make_agent: AgentFactory, observer: Observer, digits_model_bytes: bytes, tmp_path: Path
) -> None:
    install_model(tmp_path / "agents" / "dev-1", model_spec("digits", "1.0", digits_model_bytes), digits_model_bytes)
    agent = make_agent(telemetry_interval_s=0.3)
    agent.start()
    agent.infer({"input": ROWS})
    window = observer.wait_for(observer.topics.telemetry("dev-1"), TelemetryWindow, lambda w: True, timeout=10)
    assert window.inference_count == 1


def test_empty_window_is_not_closed() -> None:
    recorder = TelemetryRecorder()
    assert recorder.take() is None
    recorder.record(REF, 1.5, True, np.array([[0.1, 0.9]], dtype=np.float32))
    closed = recorder.take()
    assert closed is not None and closed.inferences == 1 and recorder.take() is None


def test_window_percentiles_and_histogram() -> None:
    recorder = TelemetryRecorder()
    for ms in [1.0] * 90 + [100.0] * 10:
        recorder.record(REF, ms, True, None)
    closed = recorder.take()
    assert closed is not None
    window = build_window("dev-1", 7, closed)
    assert window.seq == 7 and window.inference_count == 100 and window.error_count == 0
    assert window.latency is not None and window.latency.p50_ms == 1.0 and window.latency.max_ms == 100.0
    assert sum(window.latency_histogram) == 100 and window.window_end >= window.window_start


@pytest.mark.parametrize(
    ("output", "classes"),
    [
        (np.array([[0.1, 0.7, 0.2], [0.9, 0.05, 0.05]], dtype=np.float32), [1, 0]),
        (np.array([0.1, 0.9], dtype=np.float32), []),  # not [batch, classes]
        (np.zeros((2, 3, 4), dtype=np.float32), []),
        (None, []),
    ],
)
def test_predicted_classes_only_for_batch_by_class_outputs(output: np.ndarray | None, classes: list[int]) -> None:
    assert predicted_classes(output) == classes


def test_seq_is_persisted_before_use_and_never_reused(tmp_path: Path) -> None:
    path = tmp_path / "telemetry-seq"
    counter = SeqCounter(path)
    assert [counter.next(), counter.next()] == [0, 1]
    assert SeqCounter(path).next() == 2


def test_unreadable_seq_file_continues_above_every_earlier_seq(tmp_path: Path) -> None:
    path = tmp_path / "telemetry-seq"
    path.write_text("garbage")
    assert SeqCounter(path).next() > 1_000_000_000
