"""`ReportCoalescer`: the retained reported state published at most once per interval, the latest one always.

An update walks nine phases in a few hundred milliseconds, and each used to publish its event AND a retained
`ReportedState`: ~19 messages a device per update, which is what the coordinator's ingest is spent on in a large
rollout. The events stay one per phase (they are the update's history, stored by the coordinator); the reported
state is the device's *current* state, so a report that another report replaces a moment later tells nobody
anything. A coalescer publishes a change `interval_s` after it (trailing edge), with the state of that moment, and
every change until then rides along: the retained message is never more than `interval_s` behind the device, and
reports go out at most once per interval. A flush publishes at once and cancels the trailing one: terminal update
phases (`must_flush`), connectivity (`online` on connect, `offline` on stop) and a refused update, which the
coordinator's rollout and a person must see without delay. An update that ends within the interval therefore
publishes one report, its end; a longer one a report per interval it spends in the middle phases.

One class for both the agent (`agent.daemon`, trailing reports on a `threading.Timer`) and the light simulated
devices (`simulators.light`, on their epoll loop's timers), so that a light device publishes what an agent does.
The coordinator reads only terminal phases and the active model from reports (`cloud/rollouts/observations.py`);
intermediate phases reach its deployment targets through the events.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from protocol import UpdatePhase

__all__ = ["DEFAULT_REPORT_INTERVAL_S", "ReportCoalescer", "Schedule", "must_flush", "thread_timer"]

DEFAULT_REPORT_INTERVAL_S = 0.2

# Phases the coordinator and people act on at once: the update is over (or never started).
_FLUSHED_PHASES = frozenset({UpdatePhase.IDLE, UpdatePhase.ACTIVE, UpdatePhase.FAILED, UpdatePhase.ROLLED_BACK})

Cancel = Callable[[], None]
# `schedule(delay_s, action)` runs `action` once after `delay_s` seconds; it may return a way to cancel it.
Schedule = Callable[[float, Callable[[], None]], Cancel | None]


def must_flush(phase: UpdatePhase | None) -> bool:
    """Whether a report in update `phase` goes out at once (the update ended, or none runs). Pure."""
    return phase is None or phase in _FLUSHED_PHASES


def thread_timer(delay_s: float, action: Callable[[], None]) -> Cancel:
    """A `Schedule` on a daemon `threading.Timer`; returns its `cancel`."""
    timer = threading.Timer(delay_s, action)
    timer.daemon = True
    timer.name = "report-coalescer"
    timer.start()
    return timer.cancel


class ReportCoalescer:
    """Publishes through `publish` (which reads the state to send when called) at most once per `interval_s`.

    `interval_s = 0` publishes every report at once (no coalescing). Thread-safe: reports may come from the
    update worker, the MQTT thread and the timer at once; each publish happens under one lock, in order.
    """

    def __init__(
        self,
        publish: Callable[[], None],
        *,
        interval_s: float = DEFAULT_REPORT_INTERVAL_S,
        schedule: Schedule = thread_timer,
    ) -> None:
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        self._publish = publish
        self._interval_s = interval_s
        self._schedule = schedule
        self._lock = threading.Lock()
        self._pending = 0  # the token of the trailing publish scheduled, 0 when none
        self._tokens = 0
        self._cancel: Cancel | None = None
        self._closed = False
        self.published = 0  # reports published (a figure for tests and simulators)

    @property
    def pending(self) -> bool:
        """Whether a trailing publish is scheduled."""
        return self._pending != 0

    def report(self) -> None:
        """The state changed: publish it `interval_s` from now (with every change until then), or now for 0."""
        with self._lock:
            if self._closed:
                return
            if self._interval_s == 0:
                self._publish_locked(self._publish)
                return
            if self._pending:
                return  # the trailing publish will read the latest state
            self._tokens += 1
            token = self._pending = self._tokens
        cancel = self._schedule(self._interval_s, lambda: self._trailing(token))
        with self._lock:
            if self._pending == token:
                self._cancel = cancel
            elif cancel is not None:
                cancel()  # flushed meanwhile

    def flush(self, publish: Callable[[], None] | None = None) -> None:
        """Publish now (through `publish`, e.g. an `offline` goodbye, else the usual one); no trailing publish."""
        with self._lock:
            if self._closed:
                return
            self._publish_locked(publish or self._publish)

    def close(self) -> None:
        """No more publishes: a scheduled trailing one is cancelled (call before the transport goes away)."""
        with self._lock:
            self._closed = True
            self._drop_pending()

    def _trailing(self, token: int) -> None:
        with self._lock:
            if self._closed or self._pending != token:
                return  # flushed, or closed, since it was scheduled
            self._cancel = None
            self._publish_locked(self._publish)

    def _publish_locked(self, publish: Callable[[], None]) -> None:
        self._drop_pending()
        self.published += 1
        publish()

    def _drop_pending(self) -> None:
        self._pending = 0
        cancel, self._cancel = self._cancel, None
        if cancel is not None:
            cancel()
