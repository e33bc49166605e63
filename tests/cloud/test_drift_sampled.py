"""Sampled sketches still describe the traffic: an agent's recorder that sketches one call in eight (the shipped
`telemetry_sketch_rate`), served one row per call through the real ONNX Runtime session, lets the coordinator's
drift math find a shifted input distribution and clear an unshifted one, while counts and classes cover every call."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from agent.config import AgentConfig
from agent.runtime import OnnxRuntime
from agent.serving import ActiveModel, Serving
from agent.windows import TelemetryRecorder, build_window
from cloud.drift.stats import compare
from compression.data import load_dataset
from protocol import ArtifactRef, ModelSpec
from protocol.sketches import SketchSet
from protocol.tensors import onnx_tensor_specs
from simulators.drift import parse_drift
from tests.cloud.drift_helpers import digits_profile

RATE = AgentConfig.model_fields["telemetry_sketch_rate"].default
CALLS_PER_WINDOW, WINDOWS = 400, 5


def serve(model_path: Path, x: np.ndarray, *, seed: int) -> tuple[SketchSet, dict[str, int], int, list[int]]:
    """Serve `x` one row per call in windows of `CALLS_PER_WINDOW`: the windows' merged sketches, class counts,
    inference count, and the predicted class of every call."""
    data = model_path.read_bytes()
    inputs, outputs = onnx_tensor_specs(model_path)
    ref = ArtifactRef(url="http://127.0.0.1:9/unused", sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    spec = ModelSpec(name="digits", version="1.0", artifact=ref, inputs=inputs, outputs=outputs)
    recorder = TelemetryRecorder(sketch_rate=RATE, seed=seed)
    serving = Serving(record=recorder.record)
    serving.swap(ActiveModel(spec=spec, model=OnnxRuntime().load(model_path)))
    merged, classes, inferences, predicted = SketchSet(), dict[str, int](), 0, []
    for start in range(0, len(x), CALLS_PER_WINDOW):
        for row in x[start : start + CALLS_PER_WINDOW]:
            predicted.append(int(np.argmax(serving.infer({"input": row[np.newaxis]})["probabilities"])))
        closed = recorder.take()
        assert closed is not None
        window = build_window("dev-1", start // CALLS_PER_WINDOW + 1, closed)
        assert window.sketches is not None
        merged.merge(window.sketches)
        inferences += window.inference_count
        for cls, count in window.class_counts.items():
            classes[cls] = classes.get(cls, 0) + count
    return merged, classes, inferences, predicted


@pytest.fixture(scope="module")
def digits_rows() -> np.ndarray:
    rng = np.random.default_rng(5)
    data = load_dataset("digits")
    return data.x[rng.choice(len(data.x), CALLS_PER_WINDOW * WINDOWS)].astype(np.float32)


def test_the_shipped_rate_samples_about_one_call_in_eight() -> None:
    assert RATE == 0.125


def test_sampled_windows_clear_unshifted_traffic_and_count_every_call(
    digits_model_path: Path, digits_rows: np.ndarray
) -> None:
    merged, classes, inferences, predicted = serve(digits_model_path, digits_rows, seed=1)
    calls = len(digits_rows)
    assert inferences == calls and sum(classes.values()) == calls  # counts and classes: every call
    assert classes == {str(c): predicted.count(c) for c in set(predicted)}
    assert 0.5 * RATE * calls < merged.rows < 1.5 * RATE * calls  # sketches: about one call in eight
    drift = compare(digits_profile(digits_model_path), merged, classes)
    assert not drift.insufficient and not drift.drifted, drift.reasons


def test_a_shifted_input_distribution_is_still_detected_from_sampled_windows(
    digits_model_path: Path, digits_rows: np.ndarray
) -> None:
    shifted = parse_drift("noise=0.5").apply(digits_rows, np.random.default_rng(2)).astype(np.float32)
    merged, classes, _, _ = serve(digits_model_path, shifted, seed=1)
    drift = compare(digits_profile(digits_model_path), merged, classes)
    assert merged.rows < 0.2 * len(shifted) and not drift.insufficient
    assert drift.drifted and any(f.drifted for f in drift.features), drift.reasons
