"""Telemetry windows: inference and error counts, latency percentiles and histogram, predicted classes, sketches.

`TelemetryRecorder` collects (thread-safe); `build_window` turns a closed window into the wire message (pure).
Classes and confidence come from the served model's output semantics (`protocol.outputs`); the first input, the
confidence and a regressor's values are sketched per window (`protocol.sketches`). Sketching never fails an
inference: a failure is logged once and counted (`TelemetryRecorder.sketch_failures`).
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from protocol import LatencySummary, ModelRef, OutputSemantics, Predictions, SketchSet, TelemetryWindow, utcnow
from protocol.outputs import predictions
from protocol.telemetry import LATENCY_BUCKETS_MS, latency_histogram

__all__ = ["MAX_LATENCY_SAMPLES", "TelemetryRecorder", "WindowCounts", "build_window", "predicted_classes"]

log = logging.getLogger(__name__)

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
    # The sketches of the window's model; restarted when another model serves within the window, so that they
    # always describe `model`.
    sketches: SketchSet | None = None
    sketched_model: ModelRef | None = None


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
        sketches=counts.sketches.to_wire() if counts.sketches is not None else None,
    )


def predicted_classes(output: np.ndarray | None) -> list[int]:
    """Argmax per row of a `[batch, classes]` output; nothing for any other shape."""
    if output is None or output.ndim != 2 or output.shape[1] < 1 or not np.issubdtype(output.dtype, np.number):
        return []
    return [int(i) for i in np.argmax(output, axis=1)]


@dataclass(frozen=True)
class _Reading:
    """What one successful batch adds to a window besides counts: classes, the sketched input, predictions."""

    classes: np.ndarray | None = None
    batch: np.ndarray | None = None
    input_name: str = ""
    predicted: Predictions | None = None


def _read(
    inputs: Mapping[str, np.ndarray] | None,
    outputs: Mapping[str, np.ndarray],
    semantics: OutputSemantics | None,
    input_name: str | None,
) -> _Reading:
    """Classes and predictions of one batch (pure). Unknown semantics: classes by argmax of the first output."""
    predicted = predictions(semantics, outputs) if semantics is not None else Predictions()
    classes = predicted.classes
    if classes is None and (semantics is None or semantics.kind == "unknown"):
        legacy = predicted_classes(next(iter(outputs.values()), None))
        classes = np.asarray(legacy, dtype=np.int64) if legacy else None
    name, batch = "", None
    if inputs:
        name = input_name if input_name is not None and input_name in inputs else next(iter(inputs))
        batch = np.asarray(inputs[name])
    return _Reading(classes=classes, batch=batch, input_name=name, predicted=predicted)


class TelemetryRecorder:
    """Collects inference outcomes into the open window; `take()` closes it and opens the next."""

    def __init__(self, *, sketches: bool = True) -> None:
        self._lock = threading.Lock()
        self._open = WindowCounts(start=utcnow())
        self._sketches = sketches
        self.sketch_failures = 0  # batches whose classes or sketches could not be read (logged once)

    def record(
        self,
        model: ModelRef,
        latency_ms: float,
        ok: bool,
        inputs: Mapping[str, np.ndarray] | None = None,
        outputs: Mapping[str, np.ndarray] | None = None,
        *,
        semantics: OutputSemantics | None = None,
        input_name: str | None = None,
    ) -> None:
        """Count one inference and, when it ran, read its classes and sketch it (`serving.InferenceRecorder`)."""
        reading, failure = None, None
        if ok and outputs is not None:
            try:
                reading = _read(inputs if self._sketches else None, outputs, semantics, input_name)
            except Exception as exc:  # a model's odd outputs must never fail the caller's inference
                failure = exc
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
            if reading is not None:
                self._add(w, model, reading)
            if failure is not None:
                self._failed(failure)

    def _add(self, w: WindowCounts, model: ModelRef, reading: _Reading) -> None:
        """Add one batch's reading to the open window (the lock is held)."""
        if reading.classes is not None:
            for cls, count in _class_counts(reading.classes):
                w.classes[cls] = w.classes.get(cls, 0) + count
        if reading.batch is None or reading.predicted is None:
            return
        if w.sketches is None or w.sketched_model != model or w.sketches.input_name != reading.input_name:
            w.sketches, w.sketched_model = SketchSet(reading.input_name), model
        try:
            w.sketches.update(reading.batch, reading.predicted)
        except Exception as exc:  # e.g. another input shape within one model's window: this batch is not sketched
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        """Count a batch telemetry could not read (the lock is held); only the first is logged."""
        self.sketch_failures += 1
        if self.sketch_failures == 1:
            log.error(
                "telemetry could not read an inference's outputs or sketch it (logged once, counted)", exc_info=exc
            )

    def take(self) -> WindowCounts | None:
        """Close the open window; None (and the window stays open) when nothing happened in it."""
        with self._lock:
            if self._open.inferences == 0:
                return None
            closed, self._open = self._open, WindowCounts(start=utcnow())
        closed.end = self._open.start
        return closed


def _class_counts(classes: np.ndarray) -> list[tuple[str, int]]:
    """(class id, count) pairs of a batch; small batches counted directly (np.unique costs more there)."""
    if classes.size <= 8:
        counted: dict[str, int] = {}
        for cls in classes.tolist():
            counted[str(cls)] = counted.get(str(cls), 0) + 1
        return list(counted.items())
    ids, counts = np.unique(classes, return_counts=True)
    return [(str(c), n) for c, n in zip(ids.tolist(), counts.tolist(), strict=True)]


def _bucket(latency_ms: float) -> int:
    # The bucket `protocol.telemetry.latency_histogram` would count it in, without building a histogram.
    return bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)
