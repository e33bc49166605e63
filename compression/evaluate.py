"""Measure a variant on this CPU (accuracy, agreement with fp32, latency, memory, size) and gate it.

Measuring runs the real runtime (IO); `gate` is a pure decision over the numbers.
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
from compression.runtimes import open_classifier

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


@dataclass(frozen=True)
class LatencyBudget:
    """Bounds of the single-sample latency loop: warm-up runs, then at most `iterations` or `seconds`."""

    warmup: int = 20
    iterations: int = 300
    seconds: float = 2.0


@dataclass(frozen=True)
class Measurement:
    """What one variant achieved on this CPU."""

    name: str
    size_bytes: int
    accuracy: float
    agreement: float  # fraction of eval samples where the variant predicts the same class as fp32
    latency_p50_ms: float
    latency_p99_ms: float
    latency_samples: int
    peak_rss_bytes: int | None  # None if not measured; else peak RSS of a fresh process running the model
    model_rss_bytes: int | None  # that peak minus the same process's RSS before loading (runtime already imported)


@dataclass(frozen=True)
class GateVerdict:
    """Whether a variant may ship: its accuracy drop against fp32, in percentage points."""

    name: str
    accepted: bool
    drop_pp: float
    reason: str


def predictions(path: Path, data: Dataset) -> np.ndarray:
    """Predicted classes of a model file on a data set, in the model's runtime."""
    classifier = open_classifier(path)
    return np.asarray(classifier.predict(data.shaped(classifier.sample_shape)).argmax(axis=1))


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
) -> Measurement:
    """All the numbers for one variant; `reference` holds the fp32 model's predicted classes on `data`."""
    predicted = predictions(path, data)
    timings = measure_latency(path, data.x[0], budget or LatencyBudget())
    peak, delta = measure_memory(path) if memory else (None, None)
    return Measurement(
        name=name,
        size_bytes=path.stat().st_size,
        accuracy=float((predicted == data.y).mean()),
        agreement=float((predicted == reference).mean()),
        latency_p50_ms=float(np.percentile(timings, 50)),
        latency_p99_ms=float(np.percentile(timings, 99)),
        latency_samples=len(timings),
        peak_rss_bytes=peak,
        model_rss_bytes=delta,
    )


@dataclass(frozen=True)
class CompressionReport:
    """The fp32 baseline and every variant measured on one CPU, with that CPU's ISA flags."""

    baseline: Measurement
    variants: tuple[Measurement, ...]
    cpu_model: str = ""
    isa_flags: tuple[str, ...] = ()


def gate(report: CompressionReport, max_drop_pp: float = 1.0) -> list[GateVerdict]:
    """Accept each variant whose accuracy is at most `max_drop_pp` percentage points below the fp32 baseline."""
    verdicts = []
    for m in report.variants:
        drop = round((report.baseline.accuracy - m.accuracy) * 100.0, 6)
        if drop > max_drop_pp:
            reason = (
                f"accuracy {m.accuracy:.2%} is {drop:.2f} pp below fp32 ({report.baseline.accuracy:.2%}), "
                f"more than the allowed {max_drop_pp:g} pp"
            )
            verdicts.append(GateVerdict(m.name, False, drop, reason))
        else:
            verdicts.append(GateVerdict(m.name, True, drop, f"within {max_drop_pp:g} pp of fp32"))
    return verdicts
