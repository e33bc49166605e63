"""Watching live traffic during an update: the shadow run before the switch, and the trial after it.

Both attach a tap to `Serving`, so callers are never delayed: the tap only copies a request into a
bounded queue (shadow) or counts (trial). The candidate runs on the update worker's thread.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np

from agent.errors import AgentError
from agent.serving import ActiveModel, Serving
from agent.update.cancel import StepCancelledError
from agent.update.health import HealthPolicy, ShadowSample, compare_outputs, shadow_verdict
from protocol import ModelRef

__all__ = ["TrialWatch", "run_shadow"]

log = logging.getLogger(__name__)
_POLL_S = 0.1  # how often a waiting step looks at `cancelled()`

Mirrored = tuple[Mapping[str, np.ndarray], dict[str, np.ndarray], float]


def run_shadow(
    serving: Serving, candidate: ActiveModel, policy: HealthPolicy, cancelled: Callable[[], bool]
) -> str | None:
    """Run `candidate` beside the serving model on the next `policy.shadow_inferences` live requests.

    Returns why the candidate must not be switched to, or None. Callers keep getting the serving model's
    answers. With too little traffic the run ends after `shadow_timeout_s` (`shadow_on_timeout` decides).
    """
    wanted = policy.shadow_inferences
    baseline = serving.current()
    if wanted == 0:
        return None
    if baseline is None:
        log.info("no model serves yet: nothing to shadow %s against", candidate.ref)
        return None
    mirrored: queue.Queue[Mirrored] = queue.Queue(maxsize=wanted)

    def mirror(active: ActiveModel, inputs: Mapping[str, np.ndarray], outputs: object, latency_ms: float) -> None:
        if active.ref == baseline.ref and isinstance(outputs, dict):
            with contextlib.suppress(queue.Full):  # enough requests collected; the rest are not mirrored
                # Copies: the caller owns its arrays and may reuse them once it has its answer.
                mirrored.put_nowait(({k: np.array(v, copy=True) for k, v in inputs.items()}, outputs, latency_ms))

    serving.add_tap(mirror)
    samples: list[ShadowSample] = []
    deadline = time.monotonic() + policy.shadow_timeout_s
    timed_out = False
    try:
        while len(samples) < wanted:
            if cancelled():
                raise StepCancelledError(f"shadow run of {candidate.ref.name}:{candidate.ref.version} cancelled")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            try:
                inputs, served, serving_ms = mirrored.get(timeout=min(_POLL_S, remaining))
            except queue.Empty:
                continue
            start = time.perf_counter()
            try:
                answer = candidate.model.infer(inputs)
            except AgentError as exc:
                return f"candidate failed on a live request the serving model answered: {exc}"
            candidate_ms = (time.perf_counter() - start) * 1000.0
            samples.append(compare_outputs(served, answer, serving_ms=serving_ms, candidate_ms=candidate_ms))
    finally:
        serving.remove_tap(mirror)
    if timed_out:
        log.warning(
            "shadow run of %s saw %d of %d requests in %.0fs (on timeout: %s)",
            candidate.ref,
            len(samples),
            wanted,
            policy.shadow_timeout_s,
            policy.shadow_on_timeout,
        )
    return shadow_verdict(samples, policy, timed_out=timed_out)


class TrialWatch:
    """Watches the model on trial from the moment it is attached (before the swap, so no request is missed)."""

    def __init__(self, serving: Serving, trial: ModelRef) -> None:
        self.trial = trial
        self._serving = serving
        self._lock = threading.Lock()
        self._ok = 0
        self._problems: list[str] = []
        self._woken = threading.Event()
        self._started = time.monotonic()
        serving.add_tap(self._watch)

    def close(self) -> None:
        """Stop watching."""
        self._serving.remove_tap(self._watch)

    def _watch(self, active: ActiveModel, inputs: Mapping[str, np.ndarray], outputs: object, latency_ms: float) -> None:
        if active.ref != self.trial:
            return
        with self._lock:
            if not isinstance(outputs, dict):
                self._problems.append("the runtime failed on a live request")
            elif any(
                np.issubdtype(np.asarray(v).dtype, np.floating) and not np.all(np.isfinite(v)) for v in outputs.values()
            ):
                self._problems.append("a live request was answered with NaN or Inf")
            else:
                self._ok += 1
        self._woken.set()

    def wait(self, policy: HealthPolicy, cancelled: Callable[[], bool]) -> str | None:
        """Wait until the trial served for `commit_after_s` since attached (or `commit_after_inferences` good
        answers); why it failed (stopped serving, runtime failure, NaN/Inf answer), or None to commit."""
        trial = self.trial
        deadline = self._started + policy.commit_after_s
        while True:
            current = self._serving.current()
            if current is None or current.ref != trial:
                return f"{trial.name}:{trial.version} is not the model serving any more"
            with self._lock:
                if self._problems:
                    return f"{trial.name}:{trial.version} on trial: {self._problems[0]}"
                if policy.commit_after_inferences and self._ok >= policy.commit_after_inferences:
                    return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if cancelled():
                raise StepCancelledError(f"trial of {trial.name}:{trial.version} interrupted")
            self._woken.wait(min(_POLL_S, remaining))
            self._woken.clear()
