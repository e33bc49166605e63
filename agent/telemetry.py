"""Telemetry publishing: a window every interval and on `flush()`, kept on disk until the coordinator confirms it.

A closed window gets the next `seq` and its `prev_seq` (`agent.seq`), is written to the outbox (`agent.outbox`)
and only then published at QoS 1. The coordinator's `TelemetryAck` deletes what it confirms
(`TelemetryAck.confirms`). Unconfirmed windows are published again, in seq order, after every (re)connect (so
after a restart too) and whenever they have waited `resend_s` since they were last sent; the coordinator drops
duplicates by seq, so resending is safe. A broker that loses a window, a coordinator that crashes before storing
it or a database outage longer than the bridge waits therefore delays a window, never loses it.

A counter whose file is missing or unreadable does not guess: the publisher holds windows (on disk in the outbox's
`held/`, so a restart keeps them; at most `MAX_HELD_WINDOWS`) and collects the coordinator's `TelemetryAck`s after
connecting, the retained one first and then the coordinator's answer to the agent's report (the retained one may
be up to a throttle interval old). With `ACKS_TO_SETTLE` of them, or `SEQ_WAIT_S` after connecting, it continues
above everything they say is stored plus `SEQ_MARGIN` (`resume_seq`); without any, at 0 (a device that never
sent telemetry).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable

from agent.outbox import Outbox
from agent.seq import SEQ_MARGIN, SeqCounter, resume_seq, seq_after_ack
from agent.windows import TelemetryRecorder, WindowCounts, build_window, predicted_classes
from protocol import MalformedMessageError, TelemetryAck, TelemetryWindow, decode

__all__ = [
    "ACKS_TO_SETTLE",
    "MAX_HELD_WINDOWS",
    "MAX_RESEND_BACKLOG",
    "RESEND_S",
    "SEQ_MARGIN",
    "SEQ_WAIT_S",
    "SeqCounter",
    "TelemetryPublisher",
    "TelemetryRecorder",
    "WindowCounts",
    "build_window",
    "predicted_classes",
    "resume_seq",
    "seq_after_ack",
]

log = logging.getLogger(__name__)

# How long after connecting an unknown counter collects acknowledgements (the retained one comes right after
# the subscription, the coordinator answers the agent's report at once) before it settles.
SEQ_WAIT_S = 5.0
# Acknowledgements that settle an unknown counter before the wait is over: the retained one and a live answer.
ACKS_TO_SETTLE = 2
# Closed windows kept while the counter is unknown; older ones are dropped (and counted) beyond this.
MAX_HELD_WINDOWS = 100
# How long an unconfirmed window waits before it is published again (the coordinator acknowledges within ~1 s).
RESEND_S = 30.0
# QoS 1 publishes in flight above which resending waits: paho's queue (1000) must not overflow.
MAX_RESEND_BACKLOG = 200

Publish = Callable[[TelemetryWindow], None]


class TelemetryPublisher:
    """Publishes the recorder's windows every `interval_s` and on `flush()`; empty windows are not sent.

    With an `outbox`, windows wait on disk until acknowledged and are published again as the module says:
    `publish` sends a window this process has not sent yet, `republish` one it sent before (default: `publish`);
    `is_connected` says whether sending now makes sense and `backlog` how many publishes the transport still has
    in flight. Without an outbox, windows are only published.
    """

    def __init__(
        self,
        *,
        device_id: str,
        recorder: TelemetryRecorder,
        seq: SeqCounter,
        publish: Publish,
        interval_s: float,
        seq_wait_s: float = SEQ_WAIT_S,
        outbox: Outbox | None = None,
        resend_s: float = RESEND_S,
        republish: Publish | None = None,
        is_connected: Callable[[], bool] | None = None,
        backlog: Callable[[], int] | None = None,
    ) -> None:
        self._device_id = device_id
        self._recorder = recorder
        self._seq = seq
        self._publish = publish
        self._republish = republish or publish
        self._is_connected = is_connected
        self._backlog = backlog
        self._interval = interval_s
        self._seq_wait_s = seq_wait_s
        self._outbox = outbox
        self._resend_s = resend_s
        self._flush_lock = threading.Lock()
        # Closed windows without a seq yet: (hold number in the outbox or None, the window with seq 0).
        self._held: deque[tuple[int | None, TelemetryWindow]] = deque(outbox.held() if outbox is not None else ())
        self._dropped = 0  # windows dropped without an outbox to count them
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._wait: threading.Timer | None = None
        self._acks: list[TelemetryAck] = []  # acknowledgements seen while the counter is unknown
        self._acks_lock = threading.Lock()
        self._resend_lock = threading.Lock()
        self._resend_from: float | None = None  # a connect: resend what was not sent since then

    def start(self) -> None:
        """Start the interval timer thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"telemetry-{self._device_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the timer (without flushing; the caller decides)."""
        self._stop.set()
        self._wake.set()
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

    @property
    def dropped(self) -> int:
        """Windows dropped for good (outbox full, or held beyond `MAX_HELD_WINDOWS`)."""
        return self._outbox.dropped if self._outbox is not None else self._dropped

    @property
    def unconfirmed(self) -> list[int]:
        """Seqs of the windows waiting in the outbox for the coordinator to confirm them."""
        return self._outbox.seqs if self._outbox is not None else []

    def flush(self) -> TelemetryWindow | None:
        """Close the current window and publish what can be; returns the last window published, if any."""
        with self._flush_lock:
            counts = self._recorder.take()
            if counts is not None:
                self._hold(build_window(self._device_id, 0, counts))
            return self._release()

    def connected(self) -> None:
        """The transport connected: resend what is unconfirmed; an unknown counter collects acknowledgements."""
        if self._outbox is not None:
            with self._resend_lock:
                self._resend_from = time.monotonic()
            self._wake.set()
        if self._seq.known or self._wait is not None or self._stop.is_set():
            return
        self._wait = threading.Timer(self._seq_wait_s, self._settle)
        self._wait.daemon = True
        self._wait.start()

    def acknowledged(self, ack: TelemetryAck) -> None:
        """The coordinator's acknowledgement: forget what it confirms, settle (or correct) the counter, publish."""
        if self._outbox is not None:
            self._outbox.confirm(ack)
        if self._seq.known:
            if self._seq.acknowledged(ack):
                self._release_now()
            return
        with self._acks_lock:
            self._acks.append(ack)
            enough = len(self._acks) >= ACKS_TO_SETTLE
        if enough:
            self._settle()

    def resend(self, before: float | None = None) -> int:
        """Publish again, in seq order, the unconfirmed windows not sent since monotonic `before` (None: all)."""
        outbox = self._outbox
        if outbox is None:
            return 0
        count, limit = 0, math.inf if before is None else before
        for seq in outbox.due(before):
            if self._stop.is_set() or not self._connected_now() or not self._backlog_drained():
                break
            payload = outbox.payload(seq)
            if payload is None:  # confirmed meanwhile
                continue
            try:
                window = decode(TelemetryWindow, payload)
            except MalformedMessageError as exc:
                log.error(
                    "telemetry window %d of %s in the outbox is unreadable, not sent: %s", seq, self._device_id, exc
                )
                continue
            first = outbox.claim(seq, limit, time.monotonic())
            if first is None:  # confirmed, or sent by `flush` since
                continue
            # First: closed while disconnected, or by an earlier run of the agent.
            (self._publish if first else self._republish)(window)
            count += 1
        if count:
            log.info("telemetry of %s: published %d unconfirmed windows again", self._device_id, count)
        return count

    def _connected_now(self) -> bool:
        return self._is_connected is None or self._is_connected()

    def _backlog_drained(self) -> bool:
        """Wait while the transport has more than `MAX_RESEND_BACKLOG` publishes in flight; False to give up."""
        while self._backlog is not None and self._backlog() > MAX_RESEND_BACKLOG:
            if self._stop.wait(0.05) or not self._connected_now():
                return False
        return True

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

    def _hold(self, window: TelemetryWindow) -> None:
        """Keep a closed window until it has a seq: on disk while the counter is unknown (restarts keep it)."""
        number = self._outbox.hold(window) if self._outbox is not None and not self._seq.known else None
        self._held.append((number, window))
        if len(self._held) <= MAX_HELD_WINDOWS:
            return
        number, dropped = self._held.popleft()
        if self._outbox is None:
            self._dropped += 1
        elif number is None:
            self._outbox.count_dropped(1)
        else:
            self._outbox.drop_held(number)
        log.warning(
            "telemetry seq of %s still unknown: dropped the held window from %s (%d inferences), %d dropped in all",
            self._device_id,
            dropped.window_start.isoformat(),
            dropped.inference_count,
            self.dropped,
        )

    def _release(self) -> TelemetryWindow | None:
        """Give held windows their seqs in order, outbox first, then publish (caller holds the flush lock)."""
        published = None
        while self._held:
            reserved = self._seq.reserve()
            if reserved is None:
                log.debug("telemetry of %s held until its seq is known (%d windows)", self._device_id, len(self._held))
                break
            seq, prev = reserved
            number, pending = self._held[0]
            if self._outbox is not None:
                self._outbox.make_room()
            window = pending.model_copy(update={"seq": seq, "prev_seq": prev, "dropped_windows": self.dropped})
            if self._outbox is not None:
                self._outbox.add(window, held=number)
            self._seq.commit(seq)
            self._held.popleft()
            self._send(window)
            published = window
        return published

    def _send(self, window: TelemetryWindow) -> None:
        if self._outbox is not None:
            if not self._connected_now():
                return  # it waits in the outbox: the next connect publishes it
            if self._outbox.claim(window.seq, -math.inf, time.monotonic()) is None:
                return  # a resend pass got to it first
        self._publish(window)

    def _run(self) -> None:
        next_flush = time.monotonic() + self._interval
        check = max(0.05, min(self._resend_s / 2, 5.0))
        while not self._stop.is_set():
            self._wake.wait(max(0.0, min(next_flush - time.monotonic(), check)))
            self._wake.clear()
            if self._stop.is_set():
                break
            if time.monotonic() >= next_flush:
                next_flush = time.monotonic() + self._interval
                try:
                    self.flush()
                except Exception:  # a full disk or a broken publish must not end telemetry for good
                    log.exception("publishing telemetry of %s failed", self._device_id)
            try:
                self._resend_due()
            except Exception:
                log.exception("publishing unconfirmed telemetry of %s again failed", self._device_id)

    def _resend_due(self) -> None:
        if self._outbox is None:
            return
        with self._resend_lock:
            since, self._resend_from = self._resend_from, None
        if since is not None:
            self.resend(before=since)
        self.resend(before=time.monotonic() - self._resend_s)
