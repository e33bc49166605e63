"""Telemetry windows carry class counts read with the model's output semantics, and sketches of its traffic."""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

from agent.outbox import Outbox
from agent.runtime import OnnxRuntime
from agent.serving import ActiveModel, Serving
from agent.windows import TelemetryRecorder, build_window
from protocol import ArtifactRef, ModelSpec, OutputSemantics, TelemetryWindow, decode, decode_sketch
from protocol.tensors import onnx_tensor_specs
from tests.agent.conftest import AgentFactory, Observer, install_model

ROWS = np.random.default_rng(11).random((40, 64), dtype=np.float32)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, np.ndarray]:
    """A ZipMap-free skl2onnx MLP classifier on the digits (ONNX bytes) and its predictions for ROWS."""
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    from compression.reference import load_digits_split

    split = load_digits_split()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=60, random_state=0).fit(split.x_train, split.y_train)
    model = skl2onnx.to_onnx(clf, split.x_train[:1], options={id(clf): {"zipmap": False}})
    return model.SerializeToString(), clf.predict(ROWS)


def spec_of(data: bytes, tmp_path: Path, version: str = "1.0") -> tuple[ModelSpec, Path]:
    path = tmp_path / f"model-{version}.onnx"
    path.write_bytes(data)
    inputs, outputs = onnx_tensor_specs(path)
    ref = ArtifactRef(url="http://127.0.0.1:9/unused", sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    return ModelSpec(name="sk", version=version, artifact=ref, inputs=inputs, outputs=outputs), path


def serving_of(data: bytes, tmp_path: Path, recorder: TelemetryRecorder, version: str = "1.0") -> Serving:
    spec, path = spec_of(data, tmp_path, version)
    serving = Serving(record=recorder.record)
    serving.swap(ActiveModel(spec=spec, model=OnnxRuntime().load(path)))
    return serving


def test_skl2onnx_classifier_windows_count_classes_and_sketch_inputs_and_confidence(
    classifier: tuple[bytes, np.ndarray], tmp_path: Path
) -> None:
    data, expected = classifier
    recorder = TelemetryRecorder()
    serving = serving_of(data, tmp_path, recorder)
    active = serving.current()
    assert active is not None and active.semantics.label_output == "label"
    for start in range(0, len(ROWS), 8):
        serving.infer({"X": ROWS[start : start + 8]})
    serving.infer({"X": ROWS[:1]})
    closed = recorder.take()
    assert closed is not None
    window = build_window("dev-1", 3, closed)
    counted = [*expected.tolist(), int(expected[0])]
    assert window.class_counts == {str(c): counted.count(c) for c in set(counted)}
    sketches = window.sketches
    assert sketches is not None and sketches.input_name == "X" and sketches.feature_mode == "chunk-means"
    assert sketches.rows == 41 and len(sketches.features) == 8 and sketches.value is None
    assert sketches.confidence is not None and sketches.margin is not None
    confidence = decode_sketch(sketches.confidence)
    assert confidence.n == 41 and 0.1 <= confidence.get_min_value() <= confidence.get_max_value() <= 1.0
    first = decode_sketch(sketches.features[0])  # the mean of each row's first 8 pixels
    assert first.get_max_value() == pytest.approx(float(ROWS[:, :8].mean(axis=1).max()), rel=1e-6)
    assert recorder.sketch_failures == 0


def test_outputs_that_do_not_fit_the_declared_semantics_never_fail_an_inference(
    classifier: tuple[bytes, np.ndarray], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, _ = classifier
    spec, path = spec_of(data, tmp_path)
    wrong = OutputSemantics(kind="classifier", scores_output="no-such-output")
    recorder = TelemetryRecorder()
    serving = Serving(record=recorder.record)
    serving.swap(ActiveModel(spec=spec.model_copy(update={"output_semantics": wrong}), model=OnnxRuntime().load(path)))
    with caplog.at_level(logging.ERROR, logger="agent.windows"):
        for _ in range(3):
            assert set(serving.infer({"X": ROWS[:2]})) == {"label", "probabilities"}
    assert recorder.sketch_failures == 3
    assert len([r for r in caplog.records if "logged once" in r.message]) == 1
    closed = recorder.take()
    assert closed is not None and closed.inferences == 3 and closed.errors == 0 and closed.sketches is None


def test_a_model_swapped_within_a_window_restarts_its_sketches(
    classifier: tuple[bytes, np.ndarray], digits_model_bytes: bytes, tmp_path: Path
) -> None:
    data, _ = classifier
    recorder = TelemetryRecorder()
    serving = serving_of(data, tmp_path, recorder)
    serving.infer({"X": ROWS[:5]})
    spec, path = spec_of(digits_model_bytes, tmp_path, "2.0")
    serving.swap(ActiveModel(spec=spec, model=OnnxRuntime().load(path)))
    serving.infer({"input": ROWS[:3]})
    closed = recorder.take()
    assert closed is not None
    window = build_window("dev-1", 1, closed)
    assert window.model == spec.ref and window.sketches is not None
    assert window.sketches.rows == 3 and window.sketches.input_name == "input"  # only the model the window names
    assert sum(window.class_counts.values()) == 8 and recorder.sketch_failures == 0


def test_a_recorder_without_sketching_still_counts_classes(
    classifier: tuple[bytes, np.ndarray], tmp_path: Path
) -> None:
    data, expected = classifier
    recorder = TelemetryRecorder(sketches=False)
    serving_of(data, tmp_path, recorder).infer({"X": ROWS})
    closed = recorder.take()
    assert closed is not None and closed.sketches is None
    assert sum(closed.classes.values()) == len(expected)


def test_a_window_with_sketches_round_trips_through_the_outbox(
    classifier: tuple[bytes, np.ndarray], tmp_path: Path
) -> None:
    data, _ = classifier
    recorder = TelemetryRecorder()
    serving_of(data, tmp_path, recorder).infer({"X": ROWS})
    closed = recorder.take()
    assert closed is not None
    window = build_window("dev-1", 5, closed)
    Outbox(tmp_path / "telemetry").add(window)
    payload = Outbox(tmp_path / "telemetry").payload(5)  # a restarted agent reads it back from disk
    assert payload is not None
    back = decode(TelemetryWindow, payload)
    assert back == window and back.sketches is not None and back.sketches.rows == len(ROWS)


@pytest.mark.e2e
def test_agent_serving_an_skl2onnx_classifier_publishes_class_counts_and_sketches(
    make_agent: AgentFactory, observer: Observer, classifier: tuple[bytes, np.ndarray], tmp_path: Path
) -> None:
    data, expected = classifier
    spec, _ = spec_of(data, tmp_path)
    install_model(tmp_path / "agents" / "dev-1", spec, data)
    agent = make_agent(telemetry_sketch_rate=1.0)  # every call sketched: the window's rows are all of ROWS
    agent.start()
    for start in range(0, len(ROWS), 10):
        agent.infer({"X": ROWS[start : start + 10]})
    agent.flush_telemetry()
    window = observer.wait_for(observer.topics.telemetry("dev-1"), TelemetryWindow, lambda w: True)
    assert window.inference_count == 4 and window.model == spec.ref
    assert window.class_counts == {str(c): int((expected == c).sum()) for c in set(expected.tolist())}
    assert window.sketches is not None and window.sketches.rows == len(ROWS)
    assert window.sketches.confidence is not None and decode_sketch(window.sketches.confidence).n == len(ROWS)
