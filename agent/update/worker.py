"""The update worker: one thread per agent that feeds events to the pure core and runs the steps.

`boot` runs once at start-up: it counts a trial boot (rolling back when there were too many), serves the
active slot and decides about an interrupted update. Desired states arrive from the MQTT thread through
`submit` (only the newest pending one is kept). The worker persists every transition before running the
next step and reports it through `on_transition`, then calls the hooks. A newer desired state for
another model cancels a running step (download, shadow run, trial) at its next check.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from agent.errors import AgentError, TransportError
from agent.serving import Serving
from agent.update.executor import UpdateExecutor
from agent.update.hooks import UpdateHooks
from agent.update.machine import Booted, DesiredReceived, Event, Restarted, StepFailed, handle, other_slot
from agent.update.slots import SlotStore
from agent.update.state import StateFile, UpdateState
from protocol import DesiredState, ErrorCode, ErrorInfo, ModelRef, ProtocolError, UpdatePhase

__all__ = ["UpdateWorker"]

log = logging.getLogger(__name__)

Transition = Callable[[UpdateState, UpdateState], None]
# The trust gate (`agent.trust`): returns the desired state as signed metadata states it, or raises.
Gate = Callable[[DesiredState], DesiredState]
Refused = Callable[[DesiredState, ErrorInfo], None]
_GATE_RETRY_S = (2.0, 60.0)


class UpdateWorker:
    """Owns the update state of one agent."""

    def __init__(
        self,
        *,
        name: str,
        state_file: StateFile,
        executor: UpdateExecutor,
        slots: SlotStore,
        serving: Serving,
        on_transition: Transition,
        hooks: UpdateHooks | None = None,
        max_trial_boots: int = 3,
        gate: Gate | None = None,
        on_refused: Refused | None = None,
    ) -> None:
        self._gate = gate
        self._on_refused = on_refused
        self._name = name
        self._hooks = hooks or UpdateHooks()
        self._max_trial_boots = max_trial_boots
        self._file = state_file
        self._executor = executor
        self._slots = slots
        self._serving = serving
        self._on_transition = on_transition
        self._cond = threading.Condition()
        self._pending: DesiredState | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._state = state_file.load()
        self._gate_failures = 0

    @property
    def state(self) -> UpdateState:
        """The current update state."""
        return self._state

    def boot(self) -> None:
        """At start-up (before `start`): count a trial boot, serve the active slot, resume or abandon the update."""
        trial = self._state.phase in (UpdatePhase.COMMITTING, UpdatePhase.SWITCHING) and self._state.slot
        previous = self._slots.read(other_slot(self._state.slot)) if trial else None
        self._apply(
            Booted(
                active_slot=self._slots.active_slot(),
                previous=previous.ref if previous else None,
                max_trial_boots=self._max_trial_boots,
            )
        )
        if self._state.phase is UpdatePhase.ROLLED_BACK:
            try:
                self._executor.roll_back(self._state)  # again, in case the last run died before it was done
            except AgentError as exc:  # the disk refuses the pointer: serve what it points at, retry next start
                log.error("cannot complete the rollback of %s: %s", self._name, exc)
        error = self._executor.serve_active_slot()
        if error is not None and self._state.phase is UpdatePhase.COMMITTING:
            self._apply(StepFailed(error))  # the model on trial does not even load: back to the previous one
        self.resume()
        current = self._serving.current()
        self._call_hook(self._hooks.on_boot, self._state, current.ref if current else None)

    def resume(self) -> None:
        """Decide about an update interrupted by a restart (part of `boot`)."""
        current = self._serving.current()
        staged = self._slots.read(self._state.slot) if self._state.slot and self._state.in_progress else None
        self._apply(
            Restarted(
                active=current.ref if current else None,
                active_slot=self._slots.active_slot(),
                staged=staged.ref if staged else None,
            )
        )

    def submit(self, desired: DesiredState) -> None:
        """Hand over a desired state (from any thread); the newest generation wins."""
        with self._cond:
            if self._pending is None or desired.generation >= self._pending.generation:
                self._pending = desired
            self._cond.notify_all()

    def start(self) -> None:
        """Start the worker thread."""
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"update-{self._name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current step (a download is cancelled at its next chunk)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("update worker %s did not stop within %.0fs", self._name, timeout)
            self._thread = None

    def sleep(self, seconds: float) -> bool:
        """Wait `seconds` unless stopping; True when interrupted (used between download attempts)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._stopping, timeout=seconds)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._pending is not None or self._state.in_progress)
                if self._stopping:
                    return
                desired, self._pending = self._pending, None
            try:
                if desired is not None and self._gate is not None and self._is_new(desired):
                    desired = self._screen(desired)
                if desired is not None:
                    self._apply(self._desired_event(desired))
                if self._state.in_progress:
                    event = self._executor.run(self._state, self._cancelled)
                    if event is not None:
                        self._apply(event)
            except Exception:  # keep serving and keep listening, whatever a step or a report did
                log.exception("update worker %s: unexpected error", self._name)
                self.sleep(1.0)

    def _is_new(self, desired: DesiredState) -> bool:
        return self._state.generation is None or desired.generation > self._state.generation

    def _screen(self, desired: DesiredState) -> DesiredState | None:
        """The gated desired state; None when refused (reported) or when the repository is unreachable (retried)."""
        assert self._gate is not None
        try:
            return self._gate(desired)
        except TransportError as exc:
            self._gate_failures += 1
            delay = min(_GATE_RETRY_S[0] * 2 ** (self._gate_failures - 1), _GATE_RETRY_S[1])
            log.warning(
                "update %s: cannot verify generation %s yet (%s); again in %.0fs",
                self._name,
                desired.generation,
                exc,
                delay,
            )
            if not self.sleep(delay):
                self.submit(desired)  # unless a newer one arrived meanwhile
            return None
        except (ProtocolError, AgentError) as exc:
            self._gate_failures = 0
            info = exc.error_info() if isinstance(exc, AgentError) else ErrorInfo.of(_code(exc), str(exc))
            log.warning("update %s: generation %s refused: %s", self._name, desired.generation, info.message)
            if self._on_refused is not None:
                self._on_refused(desired, info)
            return None

    def _desired_event(self, desired: DesiredState) -> DesiredReceived:
        current = self._serving.current()
        active_slot = self._slots.active_slot()
        staged = None
        if desired.model is not None and (
            self._state.generation is None or desired.generation > self._state.generation
        ):
            content = self._slots.read(self._slots.inactive_slot())
            staged = content.ref if content is not None else None
        return DesiredReceived(
            desired=desired, active=current.ref if current else None, active_slot=active_slot, staged=staged
        )

    def _cancelled(self) -> bool:
        """True when the running step should stop: the agent stops, or a newer desired state wants another model."""
        with self._cond:
            if self._stopping:
                return True
            pending, target = self._pending, self._state.target
        if pending is None or self._state.generation is None or pending.generation <= self._state.generation:
            return False
        wanted: ModelRef | None = pending.model.ref if pending.model is not None else None
        return target is None or wanted != target.ref

    def _apply(self, event: Event) -> None:
        old = self._state
        new = handle(old, event)
        if new == old:
            return
        try:
            self._file.save(new)
        except OSError:
            log.exception("cannot persist the update state of %s; continuing in memory", self._name)
        self._state = new
        log.info(
            "update %s: generation %s %s -> %s%s",
            self._name,
            new.generation,
            old.phase.value,
            new.phase.value,
            f" ({new.error.code.value}: {new.error.message})" if new.error else "",
        )
        if new.phase is UpdatePhase.ROLLED_BACK and old.phase is not UpdatePhase.ROLLED_BACK:
            try:
                self._executor.roll_back(new)
            except Exception:  # the next start repeats the rollback (see `boot`)
                log.exception("rolling back %s failed", self._name)
        try:
            self._on_transition(old, new)
        except Exception:
            log.exception("reporting the update transition of %s failed", self._name)
        self._call_hook(self._hooks.on_transition, old, new)

    def _call_hook(self, hook: Callable[..., None], *args: object) -> None:
        try:
            hook(*args)
        except Exception:
            log.exception("update hook %s of %s failed", getattr(hook, "__name__", hook), self._name)


def _code(exc: ProtocolError) -> ErrorCode:
    code = getattr(exc, "code", None)
    return code if isinstance(code, ErrorCode) else ErrorCode.UNTRUSTED_UPDATE
