"""The model being served, swapped atomically while inferences run, and inference with telemetry."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from agent.errors import AgentError, InferenceFailedError, InferenceInputError, NoModelError
from agent.runtime import LoadedModel
from protocol import ModelRef, ModelSpec, OutputSemantics, infer_output_semantics

__all__ = ["ActiveModel", "InferenceRecorder", "InferenceTap", "Serving"]

log = logging.getLogger(__name__)


class InferenceRecorder(Protocol):
    """Called after every inference on the caller's thread, so it must be quick: the model, latency in ms, ok, and
    for one that ran its inputs, outputs and how the outputs read; `input_name` names the input telemetry sketches
    (the model's first); `ran` is False for a call the runtime refused before running (the caller's bad input)."""

    def __call__(
        self,
        model: ModelRef,
        latency_ms: float,
        ok: bool,
        inputs: Mapping[str, np.ndarray] | None = None,
        outputs: Mapping[str, np.ndarray] | None = None,
        semantics: OutputSemantics | None = None,
        input_name: str | None = None,
        ran: bool = True,
    ) -> None: ...


# Called after every inference that ran (not after a caller's bad input): (model, inputs, outputs or None
# when the runtime failed, latency in ms). Taps run on the caller's thread, so they must be quick.
InferenceTap = Callable[["ActiveModel", Mapping[str, np.ndarray], "dict[str, np.ndarray] | None", float], None]


@dataclass(frozen=True)
class ActiveModel:
    """A loaded model together with the spec it was deployed as."""

    spec: ModelSpec
    model: LoadedModel
    # Identity of the served model, built once: it is compared on every inference.
    ref: ModelRef = field(init=False)
    # How its outputs read (declared in the spec, else inferred once from the loaded model's outputs).
    semantics: OutputSemantics = field(init=False)
    # The model's first input: the one telemetry sketches (read once: every inference passes it on).
    input_name: str | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ref", self.spec.ref)
        object.__setattr__(self, "semantics", self.spec.output_semantics or _inferred_semantics(self))
        object.__setattr__(self, "input_name", self.spec.inputs[0].name if self.spec.inputs else None)


def _inferred_semantics(active: ActiveModel) -> OutputSemantics:
    try:
        outputs = active.model.outputs or active.spec.outputs
    except Exception:  # a runtime that cannot list its outputs: the declared ones are the best reading
        outputs = active.spec.outputs
    return infer_output_semantics(outputs)


class Serving:
    """Holds the active model. A swap replaces one reference (under a lock, to wake waiters); callers read it
    without the lock, so an inference that already took the old model finishes on it (the old session lives until
    its last caller returns)."""

    def __init__(self, record: InferenceRecorder | None = None) -> None:
        self._lock = threading.Condition()
        self._active: ActiveModel | None = None
        self._record = record
        self._taps: tuple[InferenceTap, ...] = ()

    def current(self) -> ActiveModel | None:
        """The active model right now (a snapshot: it stays valid after a swap)."""
        return self._active  # one reference read: atomic, and every swap replaces the whole reference

    def swap(self, new: ActiveModel) -> ActiveModel | None:
        """Serve `new` from now on; returns the previous model."""
        with self._lock:
            old, self._active = self._active, new
            self._lock.notify_all()
        return old

    def add_tap(self, tap: InferenceTap) -> None:
        """Let `tap` see every inference from now on (the shadow run and the trial watch live traffic)."""
        with self._lock:
            self._taps = (*self._taps, tap)

    def remove_tap(self, tap: InferenceTap) -> None:
        """Stop calling `tap` (by equality: each `obj.method` is a new bound method, equal to but not `is` the one
        added, so an identity test never removed a bound method and a trial's watch ran on every later call)."""
        with self._lock:
            self._taps = tuple(t for t in self._taps if t != tap)

    def wait_for(self, predicate: Callable[[ActiveModel | None], bool], timeout: float) -> bool:
        """Wait until `predicate(current model)` holds; False after `timeout` seconds."""
        with self._lock:
            return self._lock.wait_for(lambda: predicate(self._active), timeout=timeout)

    def infer(self, inputs: Mapping[str, np.ndarray], active: ActiveModel | None = None) -> dict[str, np.ndarray]:
        """Run `inputs` on `active` (default: the current model) and record the outcome for telemetry."""
        if active is None:
            active = self._active
            if active is None:
                raise NoModelError("no model is loaded yet")
        start = time.perf_counter()
        try:
            outputs = active.model.infer(inputs)
        except InferenceInputError:
            self._failed(active, start, ran=False)
            raise
        except AgentError:
            self._tap(active, inputs, None, self._failed(active, start, ran=True))
            raise
        except Exception as exc:  # a runtime bug must reach the caller as an agent error, and be counted
            self._tap(active, inputs, None, self._failed(active, start, ran=True))
            raise InferenceFailedError(f"inference failed: {exc}") from exc
        latency_ms = (time.perf_counter() - start) * 1000.0
        record = self._record
        if record is not None:
            record(active.ref, latency_ms, True, inputs, outputs, active.semantics, active.input_name)
        if self._taps:
            self._tap(active, inputs, outputs, latency_ms)
        return outputs

    def _tap(
        self,
        active: ActiveModel,
        inputs: Mapping[str, np.ndarray],
        outputs: dict[str, np.ndarray] | None,
        latency_ms: float,
    ) -> None:
        for tap in self._taps:
            try:
                tap(active, inputs, outputs, latency_ms)
            except Exception:  # an observer must never fail the caller's inference
                log.exception("inference tap failed")

    def _failed(self, active: ActiveModel, start: float, *, ran: bool) -> float:
        """Record a failed call; its latency in ms."""
        latency_ms = (time.perf_counter() - start) * 1000.0
        if self._record is not None:
            self._record(active.ref, latency_ms, False, ran=ran)
        return latency_ms
