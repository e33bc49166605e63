"""`UpdateHooks`: points where tests and fault injection can watch (or kill) the agent; no-ops by default.

    class KillAt(UpdateHooks):
        def on_transition(self, old, new):
            if new.phase is UpdatePhase.SWITCHING:
                os.kill(os.getpid(), signal.SIGKILL)

    Agent(config, hooks=KillAt())

The agent calls each hook on its update worker's thread (or, for `on_boot`, inside `Agent.start`), after
the new state is on disk, so whatever a hook does (even SIGKILL) finds a consistent data directory.
A hook that raises is logged and ignored. No fault code lives in the agent: `simulators.faulty_agent`
and the tests subclass this.
"""

from __future__ import annotations

from agent.update.state import UpdateState
from protocol import ModelRef

__all__ = ["UpdateHooks"]


class UpdateHooks:
    """Override the methods you need; the base class does nothing."""

    def on_boot(self, state: UpdateState, serving: ModelRef | None) -> None:
        """At start-up, once the boot counter was applied and the active slot loaded (before any step runs)."""

    def on_transition(self, old: UpdateState, new: UpdateState) -> None:
        """After every persisted transition, before the step of `new.phase` runs."""
