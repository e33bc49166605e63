"""A background thread that runs one step every `tick_s` seconds and survives the step's failures.

Used for the coordinator's housekeeping (signing the audit head, re-signing governance metadata): a failure is
logged once while it repeats (and the step is tried again next tick); a bug does not end the thread.

With `lease` (replicas of one coordinator, `cloud.leases`) every replica runs the thread, but a tick runs the step
only in the replica holding the job's lease (named after the job): taken when free, renewed at every tick, for two
ticks plus the leases' TTL. The holder thus keeps the job's period (the job runs once per tick fleet-wide, not once
per replica), and when it dies another replica takes the job over within that time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from cloud.errors import CloudError
from cloud.leases import Leases

__all__ = ["Periodic"]

log = logging.getLogger(__name__)


class Periodic:
    """Run `step` every `tick_s` seconds in a daemon thread named `name` (once at start when `at_start`); with
    `lease`, only while this replica holds the lease named `name`."""

    def __init__(
        self,
        name: str,
        step: Callable[[], object],
        tick_s: float,
        *,
        at_start: bool = False,
        lease: Leases | None = None,
    ) -> None:
        self.name = name
        self.tick_s = tick_s
        self._step = step
        self._at_start = at_start
        self._lease = lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error = ""

    def start(self) -> None:
        """Start the thread (no-op when it runs)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread after its current step."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def rest(self, seconds: float) -> bool:
        """Pause a long step for `seconds` (a step that yields to other work); True when the job is being stopped."""
        return self._stop.wait(seconds)

    def holds_lease(self) -> bool:
        """True without a lease, or when this replica holds the job's (taking it if free, renewing it if held)."""
        if self._lease is None:
            return True
        return self._lease.acquire(self.name, ttl_s=2 * self.tick_s + self._lease.ttl_s) is not None

    def leased(self, step: Callable[[], object]) -> Callable[[], object]:
        """`step`, run only while this replica holds the job's lease (`holds_lease`)."""

        def run() -> object:
            return step() if self.holds_lease() else None

        return run

    def run_guarded(self, step: Callable[[], object] | None = None) -> None:
        """Run `step` (default: the periodic one, under the job's lease); a failure is logged once while it repeats,
        never raised."""
        try:
            (step or self.leased(self._step))()
            self._last_error = ""
        except (SQLAlchemyError, CloudError, OSError) as exc:  # an outage: try again next tick
            self._report(f"{exc.__class__.__name__}: {exc}", unexpected=False)
        except Exception as exc:  # a bug must not end the thread (what it maintains would silently lapse)
            self._report(f"{exc.__class__.__name__}: {exc}", unexpected=True)

    def _report(self, message: str, *, unexpected: bool) -> None:
        if message != self._last_error:
            if unexpected:
                log.exception("%s failed unexpectedly", self.name)
            else:
                log.error("%s failed: %s", self.name, message)
        self._last_error = message

    def _run(self) -> None:
        if self._at_start:
            self.run_guarded()
        while not self._stop.wait(self.tick_s):
            self.run_guarded()
