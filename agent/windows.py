"""Telemetry windows: inference and error counts, latency percentiles and histogram, predicted classes.

`TelemetryRecorder` collects (thread-safe); `build_window` turns a closed window into the wire message (pure).
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from protocol import LatencySummary, ModelRef, TelemetryWindow, utcnow
from protocol.telemetry import LATENCY_BUCKETS_MS, latency_histogram

__all__ = ["MAX_LATENCY_SAMPLES", "TelemetryRecorder", "WindowCounts", "build_window", "predicted_classes"]

# Latencies kept per window for exact percentiles; the histogram counts every inference regardless.
MAX_LATENCY_SAMPLES = 20_000


@dataclass
class WindowCounts:
    """What happened in one window (mutable while open, handed out once closed)."""

    start: datetime
    end: datetime | None = None
    model: ModelRef | None = None
    inferences: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    histogram: list[int] = field(default_factory=lambda: latency_histogram([]))
    classes: dict[str, int] = field(default_factory=dict)


def _percentile(ordered: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(ordered), q * 100.0)) if ordered else 0.0


def build_window(device_id: str, seq: int, counts: WindowCounts) -> TelemetryWindow:
    """The wire message of a closed window."""
    latency = None
    if counts.latencies_ms:
        ordered = sorted(counts.latencies_ms)
        latency = LatencySummary(
            p50_ms=_percentile(ordered, 0.50),
            p95_ms=_percentile(ordered, 0.95),
            p99_ms=_percentile(ordered, 0.99),
            max_ms=ordered[-1],
            mean_ms=sum(ordered) / len(ordered),
        )
    return TelemetryWindow(
        device_id=device_id,
        seq=seq,
        window_start=counts.start,
        window_end=counts.end or utcnow(),
        model=counts.model,
        inference_count=counts.inferences,
        error_count=counts.errors,
        latency=latency,
        latency_histogram=counts.histogram,
        class_counts=dict(counts.classes),
    )


def predicted_classes(output: np.ndarray | None) -> list[int]:
    """Argmax per row of a `[batch, classes]` output; nothing for any other shape."""
    if output is None or output.ndim != 2 or output.shape[1] < 1 or not np.issubdtype(output.dtype, np.number):
        return []
    return [int(i) for i in np.argmax(output, axis=1)]


class TelemetryRecorder:
    """Collects inference outcomes into the open window; `take()` closes it and opens the next."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = WindowCounts(start=utcnow())

    def record(self, model: ModelRef, latency_ms: float, ok: bool, first_output: np.ndarray | None) -> None:
        """Count one inference (matches `serving.InferenceRecorder`)."""
        classes = predicted_classes(first_output) if ok else []
        latency_ms = max(0.0, latency_ms)
        with self._lock:
            w = self._open
            w.model = model
            w.inferences += 1
            if not ok:
                w.errors += 1
            if len(w.latencies_ms) < MAX_LATENCY_SAMPLES:
                w.latencies_ms.append(latency_ms)
            w.histogram[_bucket(latency_ms)] += 1
            for cls in classes:
                w.classes[str(cls)] = w.classes.get(str(cls), 0) + 1

    def take(self) -> WindowCounts | None:
        """Close the open window; None (and the window stays open) when nothing happened in it."""
        with self._lock:
            if self._open.inferences == 0:
                return None
            closed, self._open = self._open, WindowCounts(start=utcnow())
        closed.end = self._open.start
        return closed


def _bucket(latency_ms: float) -> int:
    # The bucket `protocol.telemetry.latency_histogram` would count it in, without building a histogram.
    return bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)
