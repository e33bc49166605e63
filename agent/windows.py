"""Telemetry windows: inference and error counts, latency percentiles and histogram, predicted classes, sketches.

`TelemetryRecorder` collects (thread-safe); `build_window` turns a closed window into the wire message (pure).
Classes and confidence come from the served model's output semantics (`protocol.outputs`); the first input, the
confidence and a regressor's values are sketched per window (`protocol.sketches`) for a random share of the calls
(`sketch_rate`, the agent's `telemetry_sketch_rate`); counts, latencies and classes cover every call. The caller's
thread only queues a call; calls are read and sketched in batches (see `TelemetryRecorder`). Sketching never fails
an inference: a failure is logged once and counted (`TelemetryRecorder.sketch_failures`). Labels fed back for earlier
predictions (`agent.feedback`) are counted in the window in which they arrive (`TelemetryRecorder.add_labels`); a
window in which only labels arrived is sent too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from protocol import LatencySummary, ModelRef, OutputSemantics, Predictions, SketchSet, TelemetryWindow, utcnow
from protocol.messages import LabelCounts
from protocol.outputs import predictions
from protocol.telemetry import LATENCY_BUCKETS_MS, latency_histogram

__all__ = [
    "MAX_LATENCY_SAMPLES",
    "SUMMARY_BATCH",
    "LabelTally",
    "ServedCounts",
    "TelemetryRecorder",
    "WindowCounts",
    "build_window",
    "predicted_classes",
    "read_predictions",
]

log = logging.getLogger(__name__)

# Latencies kept per window for exact percentiles; the histogram counts every inference regardless.
MAX_LATENCY_SAMPLES = 20_000
# Calls queued before the caller that fills the batch summarizes them into the open window: one numpy pass over
# 1,024 calls costs a few times what one call's own reading did (~5 µs): well under 0.1 µs a call.
SUMMARY_BATCH = 1024
_BUCKETS = np.asarray(LATENCY_BUCKETS_MS, dtype=np.float64)


@dataclass
class LabelTally:
    """Labels fed back: how many, how many the model had right, per true class `[labelled, correct]`, and a
    regressor's sum of absolute errors (the wire's `LabelCounts`, mutable)."""

    labelled: int = 0
    correct: int = 0
    by_class: dict[str, list[int]] = field(default_factory=dict)
    abs_error_sum: float = 0.0

    def add(self, other: LabelTally) -> None:
        """Add `other`'s counts to these."""
        self.labelled += other.labelled
        self.correct += other.correct
        for cls, (labelled, correct) in other.by_class.items():
            pair = self.by_class.setdefault(cls, [0, 0])
            pair[0] += labelled
            pair[1] += correct
        self.abs_error_sum += other.abs_error_sum

    def to_wire(self) -> LabelCounts | None:
        """The window's `labels`; None when no label arrived."""
        if self.labelled == 0:
            return None
        return LabelCounts(
            labelled=self.labelled,
            correct=self.correct,
            by_class={cls: list(pair) for cls, pair in self.by_class.items()},
            abs_error_sum=self.abs_error_sum,
        )


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
    labels: LabelTally = field(default_factory=LabelTally)


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
        labels=counts.labels.to_wire(),
    )


def predicted_classes(output: np.ndarray | None) -> list[int]:
    """Argmax per row of a `[batch, classes]` output; nothing for any other shape."""
    if output is None or output.ndim != 2 or output.shape[1] < 1 or not np.issubdtype(output.dtype, np.number):
        return []
    return [int(i) for i in np.argmax(output, axis=1)]


def read_predictions(outputs: Mapping[str, np.ndarray], semantics: OutputSemantics | None) -> Predictions:
    """What one batch predicted, read with the model's semantics (pure); `protocol.OutputsError` when the outputs
    do not fit them. Unknown semantics: classes by argmax of the first output, when it is `[batch, classes]`."""
    predicted = predictions(semantics, outputs) if semantics is not None else Predictions()
    if predicted.classes is None and (semantics is None or semantics.kind == "unknown"):
        legacy = predicted_classes(next(iter(outputs.values()), None))
        if legacy:
            return dataclasses.replace(predicted, classes=np.asarray(legacy, dtype=np.int64))
    return predicted


# One sampled input: its name and a copy of its rows (the caller may reuse its array once the call returns).
_Sampled = tuple[str, np.ndarray]


def _sampled(inputs: Mapping[str, np.ndarray], input_name: str | None) -> _Sampled:
    name = input_name if input_name is not None and input_name in inputs else next(iter(inputs))
    return name, np.array(inputs[name])


@dataclass
class ServedCounts:
    """Inferences that ran on one model since the recorder was made: failed ones, their latency histogram
    (`LATENCY_BUCKETS_MS`, overflow last) and summed latency; what the agent's `/metrics` reads."""

    inferences: int = 0
    errors: int = 0
    histogram: list[int] = field(default_factory=lambda: latency_histogram([]))
    latency_sum_ms: float = 0.0


# A call as the caller's thread leaves it: model, latency ms, ok, ran, outputs (when ok), sampled input,
# semantics, input name. Everything else is done later, a batch at a time (`TelemetryRecorder._summarize`).
_Call = tuple[
    ModelRef, float, bool, bool, "Mapping[str, np.ndarray] | None", "_Sampled | None", "OutputSemantics | None",
    "str | None",
]  # fmt: skip


class TelemetryRecorder:
    """Collects inference outcomes into the open window; `take()` closes it and opens the next.

    `record` only appends the call to a queue (a list: `append` is atomic, no lock) and, for a sampled call,
    copies its first input. Every `SUMMARY_BATCH` calls, the caller that fills the batch summarizes it into the
    open window: latencies bucketed at once, the outputs of consecutive calls of one model concatenated and read
    in one pass (classes, confidence), the sampled inputs sketched together. `take`, `served` and
    `sketch_failures` summarize what is queued first, so nothing recorded is missed. Calls are sampled for
    sketching with probability `sketch_rate` each (geometric gaps between sampled calls: no per-call random
    draw, no aliasing with periodic traffic); all rows of a sampled call are sketched.
    """

    def __init__(self, *, sketches: bool = True, sketch_rate: float = 1.0, seed: int | None = None) -> None:
        if not 0.0 < sketch_rate <= 1.0:
            raise ValueError(f"sketch_rate must be in (0, 1], got {sketch_rate}")
        self._lock = threading.Lock()
        self._open = WindowCounts(start=utcnow())
        self._sketches = sketches
        self._rate = sketch_rate
        self._random = random.Random(seed)
        self._countdown: float = self._gap()
        self._queue: list[_Call] = []
        self._served: dict[tuple[str, str], ServedCounts] = {}
        self._sketch_failures = 0

    @property
    def sketch_failures(self) -> int:
        """Calls whose classes or sketches could not be read (logged once)."""
        with self._lock:
            self._summarize_queued()
            return self._sketch_failures

    def record(
        self,
        model: ModelRef,
        latency_ms: float,
        ok: bool,
        inputs: Mapping[str, np.ndarray] | None = None,
        outputs: Mapping[str, np.ndarray] | None = None,
        semantics: OutputSemantics | None = None,
        input_name: str | None = None,
        ran: bool = True,
    ) -> None:
        """Count one inference and, when it ran, read its classes and sketch it (`serving.InferenceRecorder`);
        `ran` False: the runtime refused the inputs (counted in telemetry, not in `served`)."""
        sampled = None
        if inputs and ok:
            countdown = self._countdown - 1  # inf when not sketching
            if countdown > 0:
                self._countdown = countdown
            else:
                self._countdown = self._gap()
                try:
                    sampled = _sampled(inputs, input_name)
                except Exception:  # not an array: its reading fails later, counted like any other
                    sampled = None
        queue = self._queue
        queue.append((model, latency_ms, ok, ran, outputs if ok else None, sampled, semantics, input_name))
        if len(queue) >= SUMMARY_BATCH and self._lock.acquire(blocking=False):
            try:  # another thread summarizing takes this batch too
                self._summarize_queued()
            finally:
                self._lock.release()

    def _gap(self) -> float:
        """Calls until the next sampled one: geometric with mean 1 / rate (1 when every call is sketched)."""
        if not self._sketches:
            return math.inf
        if self._rate >= 1.0:
            return 1
        return 1 + int(math.log(1.0 - self._random.random()) / math.log(1.0 - self._rate))

    def _summarize_queued(self) -> None:
        """Summarize every queued call into the open window (the lock is held)."""
        queue = self._queue
        calls = queue[:]  # appenders only append: the first len(calls) stay these calls while they are deleted
        if not calls:
            return
        del queue[: len(calls)]
        first = calls[0]
        n = len(calls)
        columns = list(zip(*calls, strict=True))
        if columns[0].count(first[0]) == n and columns[6].count(first[6]) == n and columns[7].count(first[7]) == n:
            self._summarize(self._open, columns)  # the usual case: one model served the whole batch
            return
        start = 0
        while start < n:  # runs of consecutive calls of one model, read the same way
            end = start + 1
            while end < n and _same_run(calls[end], calls[start]):
                end += 1
            self._summarize(self._open, list(zip(*calls[start:end], strict=True)))
            start = end

    def _summarize(self, w: WindowCounts, columns: list[tuple[Any, ...]]) -> None:
        """Add a run of calls of one model, as columns of `_Call`s, to the open window (the lock is held)."""
        models, latency_column, oks, rans, outputs, sampled, semantics, _ = columns
        model, count = models[0], len(models)
        w.model = model
        w.inferences += count
        latencies = np.maximum(np.array(latency_column, dtype=np.float64), 0.0)
        buckets = np.searchsorted(_BUCKETS, latencies, side="left")
        w.histogram = _added(w.histogram, np.bincount(buckets, minlength=len(w.histogram)))
        room = MAX_LATENCY_SAMPLES - len(w.latencies_ms)
        if room > 0:
            w.latencies_ms.extend(latencies[:room].tolist())
        served = self._served.setdefault((model.name, model.version), ServedCounts())
        failures = count - oks.count(True)
        w.errors += failures
        if failures == 0:
            served.inferences += count
            served.histogram = _added(served.histogram, np.bincount(buckets, minlength=len(served.histogram)))
            served.latency_sum_ms += float(latencies.sum())
        else:
            ran = np.array(rans, dtype=bool)
            served.inferences += int(ran.sum())
            served.errors += sum(1 for ok, r in zip(oks, rans, strict=True) if r and not ok)
            served.histogram = _added(served.histogram, np.bincount(buckets[ran], minlength=len(served.histogram)))
            served.latency_sum_ms += float(latencies[ran].sum())
        if failures == count or outputs.count(None) == count:
            return
        if failures or outputs.count(None):
            kept = [(o, x) for o, x in zip(outputs, sampled, strict=True) if o is not None]
            outputs, sampled = tuple(o for o, _ in kept), tuple(x for _, x in kept)
        self._read(w, model, semantics[0], outputs, sampled)

    def _read(
        self,
        w: WindowCounts,
        model: ModelRef,
        semantics: OutputSemantics | None,
        outputs: tuple[Mapping[str, np.ndarray], ...],
        sampled: tuple[_Sampled | None, ...],
    ) -> None:
        """Classes and sketches of calls that ran, read in one pass; call by call when one pass cannot read them."""
        try:
            predicted = _read_together(outputs, semantics)
        except Exception:  # outputs that do not concatenate or do not fit: read each, so each failure is counted
            for one, x in zip(outputs, sampled, strict=True):
                self._read_one(w, model, semantics, one, x)
            return
        if predicted.classes is not None:
            _count_classes(w, predicted.classes)
        picked = [x for x in sampled if x is not None]
        if not picked:
            return
        name = next(iter(outputs[0]))
        rows = np.array([len(o[name]) for o in outputs], dtype=np.int64)
        try:
            ((input_name,),) = [{n for n, _ in picked}]
            batch = np.concatenate([array for _, array in picked]) if len(picked) > 1 else picked[0][1]
        except ValueError:  # several input names, or shapes that do not stack: sketch call by call
            offsets = np.concatenate([[0], np.cumsum(rows)])
            for i, x in enumerate(sampled):
                if x is not None:
                    own = np.arange(offsets[i], offsets[i + 1])
                    self._sketch(w, model, x[0], x[1], _rows_of(predicted, own))
            return
        mask = np.repeat(np.array([x is not None for x in sampled], dtype=bool), rows)
        self._sketch(w, model, input_name, batch, _rows_of(predicted, mask))

    def _read_one(
        self,
        w: WindowCounts,
        model: ModelRef,
        semantics: OutputSemantics | None,
        outputs: Mapping[str, np.ndarray],
        sampled: _Sampled | None,
    ) -> None:
        """One call's classes and sketch, as `_read` does for many (the lock is held)."""
        try:
            predicted = read_predictions(outputs, semantics)
        except Exception as exc:  # a model's odd outputs must never fail the caller's inference
            self._failed(exc)
            return
        if predicted.classes is not None:
            _count_classes(w, predicted.classes)
        if sampled is not None:
            self._sketch(w, model, sampled[0], sampled[1], predicted)

    def _sketch(
        self, w: WindowCounts, model: ModelRef, input_name: str, batch: np.ndarray, predicted: Predictions
    ) -> None:
        if w.sketches is None or w.sketched_model != model or w.sketches.input_name != input_name:
            w.sketches, w.sketched_model = SketchSet(input_name), model
        try:
            w.sketches.update(batch, predicted)
        except Exception as exc:  # e.g. another input shape within one model's window: this batch is not sketched
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        """Count a batch telemetry could not read (the lock is held); only the first is logged."""
        self._sketch_failures += 1
        if self._sketch_failures == 1:
            log.error(
                "telemetry could not read an inference's outputs or sketch it (logged once, counted)", exc_info=exc
            )

    def add_labels(self, model: ModelRef, tally: LabelTally) -> None:
        """Count labels fed back for predictions of `model` in the open window (the window in which they arrive)."""
        with self._lock:
            self._summarize_queued()
            w = self._open
            if w.model is None:  # a window of labels only still says which model they are about
                w.model = model
            w.labels.add(tally)

    def served(self) -> dict[tuple[str, str], ServedCounts]:
        """Counts per (model name, version) of the inferences that ran since the recorder was made (copies)."""
        with self._lock:
            self._summarize_queued()
            return {key: dataclasses.replace(c, histogram=list(c.histogram)) for key, c in self._served.items()}

    def take(self) -> WindowCounts | None:
        """Close the open window; None (and the window stays open) when nothing happened in it."""
        with self._lock:
            self._summarize_queued()
            if self._open.inferences == 0 and self._open.labels.labelled == 0:
                return None
            closed, self._open = self._open, WindowCounts(start=utcnow())
        closed.end = self._open.start
        return closed


def _same_run(call: _Call, first: _Call) -> bool:
    """Whether `call` is read like `first`: same model, semantics and sketched input."""
    return (call[0] is first[0] or call[0] == first[0]) and call[6] is first[6] and call[7] == first[7]


def _added(counts: list[int], more: np.ndarray) -> list[int]:
    return [a + b for a, b in zip(counts, more.tolist(), strict=True)]


def _read_together(outputs: tuple[Mapping[str, np.ndarray], ...], semantics: OutputSemantics | None) -> Predictions:
    """The predictions of many calls' outputs read as one batch; `ValueError` (or the reading's own error) when
    they cannot be read together (a row of predictions per row of the first output)."""
    first = outputs[0]
    merged = first if len(outputs) == 1 else {name: np.concatenate([o[name] for o in outputs]) for name in first}
    total = len(next(iter(merged.values())))
    predicted = read_predictions(merged, semantics)
    for values in (predicted.classes, predicted.top1, predicted.margin, predicted.values):
        if values is not None and len(values) != total:
            raise ValueError(f"{len(values)} predictions for {total} rows")
    return predicted


def _rows_of(predicted: Predictions, rows: np.ndarray) -> Predictions:
    """The predictions of some rows (`rows`: indices or a mask), for the sketches."""
    top1, margin, values = predicted.top1, predicted.margin, predicted.values
    return Predictions(
        top1=None if top1 is None else top1[rows],
        margin=None if margin is None else margin[rows],
        values=None if values is None else values[rows],
    )


def _count_classes(w: WindowCounts, classes: np.ndarray) -> None:
    for cls, count in _class_counts(classes):
        w.classes[cls] = w.classes.get(cls, 0) + count


def _class_counts(classes: np.ndarray) -> list[tuple[str, int]]:
    """(class id, count) pairs of a batch; small batches counted directly (np.unique costs more there)."""
    if classes.size <= 8:
        counted: dict[str, int] = {}
        for cls in classes.tolist():
            counted[str(cls)] = counted.get(str(cls), 0) + 1
        return list(counted.items())
    ids, counts = np.unique(classes, return_counts=True)
    return [(str(c), n) for c, n in zip(ids.tolist(), counts.tolist(), strict=True)]
