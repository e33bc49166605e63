"""Sketch benchmark: the cost of per-window sketches on the agent's serving path, as a ratio in the same run.

`Serving.infer` (the path the agent's HTTP handler and `Agent.infer` take) with the real `TelemetryRecorder`,
sketching every call, sketching at the shipped `telemetry_sketch_rate`, and not sketching (class counts are read
in all three), on the demo model (the reference digits MLP, ONNX Runtime) and on a ZipMap-free skl2onnx MLP (label
+ probabilities), at batch 1 and 32. Rounds interleave the recorders so machine noise falls on all; the figure is
the median over rounds of µs per call (the calling thread's CPU time: other processes' load stays out of it).
Also prints the encoded size of a full window (16 direct features, confidence, margin) after 10,000 rows.

Run: `.venv/bin/python benchmarks/bench_sketches.py` (about half a minute).
"""

from __future__ import annotations

import hashlib
import statistics
import sys
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.config import AgentConfig
from agent.runtime import OnnxRuntime
from agent.serving import ActiveModel, Serving
from agent.windows import TelemetryRecorder
from compression.reference import load_digits_split, train_digits_mlp
from protocol import ArtifactRef, ModelSpec, Predictions, SketchSet, TelemetryWindow, encode
from protocol.tensors import onnx_tensor_specs

ROUNDS = 15
CALLS = 2048  # two summary batches of the recorder
RATE = AgentConfig.model_fields["telemetry_sketch_rate"].default


def skl2onnx_mlp() -> bytes:
    """A ZipMap-free skl2onnx MLP classifier on the digits."""
    import skl2onnx
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    split = load_digits_split()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=100, random_state=0).fit(split.x_train, split.y_train)
    return skl2onnx.to_onnx(clf, split.x_train[:1], options={id(clf): {"zipmap": False}}).SerializeToString()


def serving(data: bytes, directory: Path, sketches: bool, rate: float = 1.0) -> tuple[Serving, str]:
    """A `Serving` of `data` with a real recorder, sketching (a share `rate` of the calls) or not, and the model's
    input name."""
    path = directory / f"{hashlib.sha256(data).hexdigest()[:12]}.onnx"
    path.write_bytes(data)
    inputs, outputs = onnx_tensor_specs(path)
    ref = ArtifactRef(url="http://127.0.0.1:9/unused", sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    spec = ModelSpec(name="bench", version="1", artifact=ref, inputs=inputs, outputs=outputs)
    recorder = TelemetryRecorder(sketches=sketches, sketch_rate=rate, seed=0)
    served = Serving(record=recorder.record)
    served.swap(ActiveModel(spec=spec, model=OnnxRuntime().load(path)))
    return served, inputs[0].name


def per_call_us(served: Serving, feed: dict[str, np.ndarray]) -> float:
    start = time.thread_time()
    for _ in range(CALLS):
        served.infer(feed)
    return (time.thread_time() - start) / CALLS * 1e6


def compare(name: str, data: bytes, directory: Path, x: np.ndarray) -> None:
    (every, input_name), (sampled, _) = serving(data, directory, True), serving(data, directory, True, RATE)
    off, _ = serving(data, directory, False)
    for batch in (1, 32):
        feed = {input_name: x[:batch]}
        times: dict[str, list[float]] = {"every": [], "sampled": [], "off": []}
        for served in (every, sampled, off):
            per_call_us(served, feed)  # warm-up
        for _ in range(ROUNDS):
            for key, served in (("every", every), ("sampled", sampled), ("off", off)):
                times[key].append(per_call_us(served, feed))
        a, s, b = (statistics.median(times[k]) for k in ("every", "sampled", "off"))
        print(
            f"{name:<16} batch {batch:>2}: every call {a:8.1f} µs/call ({a / b:4.2f}x), rate {RATE} {s:8.1f} "
            f"({s / b:4.2f}x), without {b:8.1f} µs/call"
        )


def window_size() -> int:
    rng = np.random.default_rng(0)
    sketches = SketchSet("input")
    for _ in range(100):
        top1 = rng.uniform(0.3, 1, 100)
        sketches.update(rng.random((100, 16)), Predictions(top1=top1, margin=top1 * rng.uniform(0, 1, 100)))
    now = datetime.now(UTC)
    window = TelemetryWindow(
        device_id="dev-1", seq=1, window_start=now, window_end=now, inference_count=1, error_count=0,
        sketches=sketches.to_wire(),
    )  # fmt: skip
    return len(encode(window))


def main() -> None:
    x = np.ascontiguousarray(load_digits_split().x_test[:32])
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        compare("digits MLP", train_digits_mlp().onnx_bytes, directory, x)
        compare("skl2onnx MLP", skl2onnx_mlp(), directory, x)
    print(f"encoded window, 16 direct features + confidence + margin, 10,000 rows: {window_size()} bytes")


if __name__ == "__main__":
    main()
