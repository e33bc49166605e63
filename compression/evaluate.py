"""Measure a variant on this CPU (its scores, latency, memory, size); the scores and the gate are `scoring`'s.

Measuring runs the real runtime (IO); `scoring.gate` is a pure decision over the numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compression.data import Dataset
from compression.errors import ConversionError
from compression.outputs import EvaluatedOutput, OutputKind
from compression.runtimes import open_classifier
from compression.scoring import CompressionReport, GateVerdict, Measurement, class_ids, gate, score

__all__ = [
    "CompressionReport",
    "GateVerdict",
    "LatencyBudget",
    "Measurement",
    "gate",
    "measure",
    "measure_latency",
    "measure_memory",
    "predictions",
]

_FIRST_OUTPUT_SCORES = EvaluatedOutput("", OutputKind.SCORES)  # the reference CNN's: logits, its only output


@dataclass(frozen=True)
class LatencyBudget:
    """Bounds of the single-sample latency loop: warm-up runs, then at most `iterations` or `seconds`."""

    warmup: int = 20
    iterations: int = 300
    seconds: float = 2.0


def predictions(path: Path, data: Dataset, target: EvaluatedOutput = _FIRST_OUTPUT_SCORES) -> np.ndarray:
    """What a model file predicts on a data set, in its runtime: class ids, or a regressor's values."""
    model = open_classifier(path, output=target.name or None)
    output = model.predict(data.shaped(model.sample_shape))
    if target.kind is OutputKind.VALUES:
        return np.asarray(output, dtype=np.float64).reshape(len(output), -1)
    return class_ids(output, target.kind)


def measure_latency(path: Path, sample: np.ndarray, budget: LatencyBudget) -> np.ndarray:
    """Single-sample latencies in milliseconds, after warm-up, bounded by count and time."""
    classifier = open_classifier(path)
    one = sample.reshape((1, *classifier.sample_shape)).astype(np.float32)
    for _ in range(budget.warmup):
        classifier.predict_one(one)
    timings: list[float] = []
    deadline = time.perf_counter() + budget.seconds
    while len(timings) < budget.iterations and time.perf_counter() < deadline:
        start = time.perf_counter_ns()
        classifier.predict_one(one)
        timings.append((time.perf_counter_ns() - start) / 1e6)
    return np.asarray(timings)


def measure_memory(path: Path, *, timeout_s: float = 60.0) -> tuple[int, int]:
    """(peak RSS, peak RSS minus the runtime-only baseline) of a fresh process that loads and runs `path`."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "compression._probe", str(path)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        )
    except subprocess.CalledProcessError as exc:
        raise ConversionError(f"{path.name}: memory probe failed: {exc.stderr.strip()[-500:]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise ConversionError(f"{path.name}: memory probe took more than {timeout_s:.0f} s") from exc
    result = json.loads(done.stdout.strip().splitlines()[-1])
    peak, baseline = int(result["peak_rss_bytes"]), int(result["baseline_rss_bytes"])
    return peak, max(0, peak - baseline)


def measure(
    name: str,
    path: Path,
    data: Dataset,
    reference: np.ndarray,
    *,
    budget: LatencyBudget | None = None,
    memory: bool = True,
    target: EvaluatedOutput = _FIRST_OUTPUT_SCORES,
) -> Measurement:
    """All the numbers for one variant; `reference` holds the fp32 model's `predictions` on `data`."""
    scores = score(target, predictions(path, data, target), reference, data.y)
    timings = measure_latency(path, data.x[0], budget or LatencyBudget())
    peak, delta = measure_memory(path) if memory else (None, None)
    return Measurement(
        name=name,
        size_bytes=path.stat().st_size,
        accuracy=scores.accuracy,
        agreement=scores.agreement,
        mae=scores.mae,
        rmse=scores.rmse,
        deviation_pct=scores.deviation_pct,
        latency_p50_ms=float(np.percentile(timings, 50)),
        latency_p99_ms=float(np.percentile(timings, 99)),
        latency_samples=len(timings),
        peak_rss_bytes=peak,
        model_rss_bytes=delta,
    )
