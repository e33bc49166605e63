"""Telemetry windows: inference and error counts, latency percentiles and histogram, predicted classes.

`TelemetryRecorder` collects (thread-safe); `build_window` turns a closed window into the wire message
(pure); `SeqCounter` hands out the per-device `seq`, persisted *before* use so it is never reused
across restarts; `TelemetryPublisher` closes and publishes a window every interval and on `flush()`.

A counter whose file is missing or unreadable does not guess: the publisher holds windows (in memory,
bounded) and collects the coordinator's `TelemetryAck`s after connecting, the retained one first and then the
coordinator's answer to the agent's report (the retained one may be up to a throttle interval old). With
`ACKS_TO_SETTLE` of them, or `SEQ_WAIT_S` after connecting, it continues above everything they say is stored
plus `SEQ_MARGIN` (`resume_seq`); without any, at 0 (a device that never sent telemetry).
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from agent._fs import atomic_write_bytes
from protocol import LatencySummary, ModelRef, TelemetryAck, TelemetryWindow, utcnow
from protocol.telemetry import LATENCY_BUCKETS_MS, latency_histogram

__all__ = [
    "ACKS_TO_SETTLE",
    "MAX_HELD_WINDOWS",
    "SEQ_MARGIN",
    "SEQ_WAIT_S",
    "SeqCounter",
    "TelemetryPublisher",
    "TelemetryRecorder",
    "WindowCounts",
    "build_window",
    "resume_seq",
    "seq_after_ack",
]

log = logging.getLogger(__name__)

# Latencies kept per window for exact percentiles; the histogram counts every inference regardless.
MAX_LATENCY_SAMPLES = 20_000
# Seqs left out above the coordinator's `max_seq` when the counter was lost: windows an earlier run published
# that the coordinator had not stored when it acknowledged (at most paho's queue, `MqttTransport(max_queued)`).
SEQ_MARGIN = 1000
# How long after connecting an unknown counter collects acknowledgements (the retained one comes right after
# the subscription, the coordinator answers the agent's report at once) before it settles.
SEQ_WAIT_S = 5.0
# Acknowledgements that settle an unknown counter before the wait is over: the retained one and a live answer.
ACKS_TO_SETTLE = 2
# Closed windows kept while the counter is unknown; older ones are dropped beyond this.
MAX_HELD_WINDOWS = 100


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


def resume_seq(acks: Sequence[TelemetryAck], margin: int = SEQ_MARGIN) -> int:
    """Where a lost counter continues: `margin` above every seq any of `acks` says is stored; 0 without any. Pure.

    The margin applies to "nothing stored" too: an acknowledgement can be older than windows already on their
    way (the coordinator throttles it, and stores what the broker still holds only when it can).
    """
    if not acks:
        return 0
    stored = max((ack.max_seq for ack in acks if ack.max_seq is not None), default=-1)
    return stored + 1 + margin


def seq_after_ack(next_seq: int, ack: TelemetryAck, margin: int = SEQ_MARGIN) -> int | None:
    """The seq a known counter jumps to when `ack` shows its next seq already stored, else None. Pure.

    That counter's file was restored from an older copy: seqs at or below `max_seq` would be dropped as
    duplicates.
    """
    if ack.max_seq is not None and ack.max_seq >= next_seq:
        return resume_seq([ack], margin)
    return None


class SeqCounter:
    """Per-device telemetry sequence numbers, persisted in `path` before each is used.

    Without a readable file the counter is unknown (`next()` returns None) until `resume` settles it from the
    coordinator's acknowledgements (or from none: a device that never sent telemetry starts at 0).
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._next = self._load()

    def _load(self) -> int | None:
        try:
            text = self._path.read_text()
        except FileNotFoundError:
            log.info("no telemetry seq file %s; holding windows until the coordinator acknowledges", self._path)
            return None
        except OSError as exc:
            log.warning("cannot read telemetry seq %s (%s); holding windows until acknowledged", self._path, exc)
            return None
        try:
            value = int(text.strip())
        except ValueError:
            value = -1
        if value < 0:
            log.warning("unreadable telemetry seq %s (%r); holding windows until acknowledged", self._path, text[:40])
            return None
        return value

    @property
    def known(self) -> bool:
        """True once the counter knows where it stands (its file, or `resume`)."""
        with self._lock:
            return self._next is not None

    def next(self) -> int | None:
        """The next seq, the one after it on disk before this returns; None while the counter is unknown."""
        with self._lock:
            seq = self._next
            if seq is None:
                return None
            atomic_write_bytes(self._path, str(seq + 1).encode())
            self._next = seq + 1
            return seq

    def resume(self, acks: Sequence[TelemetryAck]) -> bool:
        """Settle an unknown counter at `resume_seq(acks)`; False (and nothing changes) if it is known."""
        with self._lock:
            if self._next is not None:
                return False
            self._set(resume_seq(acks))
            target = self._next
        if not acks:
            log.info("telemetry seq starts at 0: no acknowledgement from the coordinator (never sent telemetry)")
        else:
            stored = max((a.max_seq for a in acks if a.max_seq is not None), default=None)
            log.warning(
                "telemetry seq continues at %d (no usable seq file): coordinator stored %s, +%d for windows in flight",
                target,
                "nothing" if stored is None else f"up to {stored}",
                SEQ_MARGIN,
            )
        return True

    def acknowledged(self, ack: TelemetryAck) -> bool:
        """Check a known counter against the coordinator's acknowledgement (`seq_after_ack`); True if it jumped."""
        with self._lock:
            previous = self._next
            target = None if previous is None else seq_after_ack(previous, ack)
            if previous is None or target is None:
                return False
            self._set(target)
        log.warning(
            "telemetry seq jumps from %d to %d: the coordinator stored up to %s already (seq file from an older copy?)",
            previous,
            target,
            ack.max_seq,
        )
        return True

    def _set(self, value: int) -> None:
        atomic_write_bytes(self._path, str(value).encode())
        self._next = value


class TelemetryPublisher:
    """Publishes the recorder's windows every `interval_s` and on `flush()`; empty windows are not sent.

    While the seq counter is unknown, closed windows are held (at most `MAX_HELD_WINDOWS`) and published,
    in order, once `ACKS_TO_SETTLE` acknowledgements or the end of the wait after `connected()` settle it.
    """

    def __init__(
        self,
        *,
        device_id: str,
        recorder: TelemetryRecorder,
        seq: SeqCounter,
        publish: Callable[[TelemetryWindow], None],
        interval_s: float,
        seq_wait_s: float = SEQ_WAIT_S,
    ) -> None:
        self._device_id = device_id
        self._recorder = recorder
        self._seq = seq
        self._publish = publish
        self._interval = interval_s
        self._seq_wait_s = seq_wait_s
        self._flush_lock = threading.Lock()
        self._held: deque[WindowCounts] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wait: threading.Timer | None = None
        self._acks: list[TelemetryAck] = []  # acknowledgements seen while the counter is unknown
        self._acks_lock = threading.Lock()

    def start(self) -> None:
        """Start the interval timer thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"telemetry-{self._device_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the timer (without flushing; the caller decides)."""
        self._stop.set()
        if self._wait is not None:
            self._wait.cancel()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def held(self) -> int:
        """Closed windows waiting for the seq counter to be settled."""
        with self._flush_lock:
            return len(self._held)

    def flush(self) -> TelemetryWindow | None:
        """Close the current window and publish what can be; returns the last window published, if any."""
        with self._flush_lock:
            counts = self._recorder.take()
            if counts is not None:
                self._hold(counts)
            return self._release()

    def connected(self) -> None:
        """The transport connected: an unknown counter collects acknowledgements for `seq_wait_s` (once)."""
        if self._seq.known or self._wait is not None or self._stop.is_set():
            return
        self._wait = threading.Timer(self._seq_wait_s, self._settle)
        self._wait.daemon = True
        self._wait.start()

    def acknowledged(self, ack: TelemetryAck) -> None:
        """The coordinator's acknowledgement arrived: settle (or correct) the counter, then publish held windows."""
        if self._seq.known:
            if self._seq.acknowledged(ack):
                self._release_now()
            return
        with self._acks_lock:
            self._acks.append(ack)
            enough = len(self._acks) >= ACKS_TO_SETTLE
        if enough:
            self._settle()

    def _settle(self) -> None:
        with self._acks_lock:
            acks = list(self._acks)
        if self._seq.resume(acks):
            self._release_now()

    def _release_now(self) -> None:
        try:
            with self._flush_lock:
                self._release()
        except Exception:  # called from the MQTT thread or a timer: report, never raise
            log.exception("publishing held telemetry of %s failed", self._device_id)

    def _hold(self, counts: WindowCounts) -> None:
        self._held.append(counts)
        if len(self._held) > MAX_HELD_WINDOWS:
            dropped = self._held.popleft()
            log.warning(
                "telemetry seq of %s still unknown: dropped the held window from %s (%d inferences)",
                self._device_id,
                dropped.start.isoformat(),
                dropped.inferences,
            )

    def _release(self) -> TelemetryWindow | None:
        """Publish held windows in order while the counter hands out seqs (caller holds the flush lock)."""
        published = None
        while self._held:
            seq = self._seq.next()
            if seq is None:
                log.debug("telemetry of %s held until its seq is known (%d windows)", self._device_id, len(self._held))
                break
            window = build_window(self._device_id, seq, self._held.popleft())
            self._publish(window)
            published = window
        return published

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.flush()
            except Exception:  # a full disk or a broken publish must not end telemetry for good
                log.exception("publishing telemetry of %s failed", self._device_id)
