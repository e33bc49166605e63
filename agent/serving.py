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
    """Called after every inference: the model, latency in ms, ok, and for one that ran its inputs, outputs and
    how the outputs read; `input_name` names the input telemetry sketches (the model's first)."""

    def __call__(
        self,
        model: ModelRef,
        latency_ms: float,
        ok: bool,
        inputs: Mapping[str, np.ndarray] | None = None,
        outputs: Mapping[str, np.ndarray] | None = None,
        *,
        semantics: OutputSemantics | None = None,
        input_name: str | None = None,
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "ref", self.spec.ref)
        object.__setattr__(self, "semantics", self.spec.output_semantics or _inferred_semantics(self))

    @property
    def input_name(self) -> str:
        """The model's first input: the one telemetry sketches."""
        return self.spec.inputs[0].name


def _inferred_semantics(active: ActiveModel) -> OutputSemantics:
    try:
        outputs = active.model.outputs or active.spec.outputs
    except Exception:  # a runtime that cannot list its outputs: the declared ones are the best reading
        outputs = active.spec.outputs
    return infer_output_semantics(outputs)


class Serving:
    """Holds the active model. The swap replaces a reference under a lock; an inference that already took
    the old model finishes on it (the old session lives until its last caller returns)."""

    def __init__(self, record: InferenceRecorder | None = None) -> None:
        self._lock = threading.Condition()
        self._active: ActiveModel | None = None
        self._record = record
        self._taps: tuple[InferenceTap, ...] = ()

    def current(self) -> ActiveModel | None:
        """The active model right now (a snapshot: it stays valid after a swap)."""
        with self._lock:
            return self._active

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
        """Stop calling `tap`."""
        with self._lock:
            self._taps = tuple(t for t in self._taps if t is not tap)

    def wait_for(self, predicate: Callable[[ActiveModel | None], bool], timeout: float) -> bool:
        """Wait until `predicate(current model)` holds; False after `timeout` seconds."""
        with self._lock:
            return self._lock.wait_for(lambda: predicate(self._active), timeout=timeout)

    def infer(self, inputs: Mapping[str, np.ndarray], active: ActiveModel | None = None) -> dict[str, np.ndarray]:
        """Run `inputs` on `active` (default: the current model) and record the outcome for telemetry."""
        active = active or self.current()
        if active is None:
            raise NoModelError("no model is loaded yet")
        start = time.perf_counter()
        try:
            outputs = active.model.infer(inputs)
        except InferenceInputError:
            self._note(active, start)
            raise
        except AgentError:
            self._note(active, start)
            self._tap(active, inputs, None, start)
            raise
        except Exception as exc:  # a runtime bug must reach the caller as an agent error, and be counted
            self._note(active, start)
            self._tap(active, inputs, None, start)
            raise InferenceFailedError(f"inference failed: {exc}") from exc
        self._note(active, start, inputs, outputs)
        self._tap(active, inputs, outputs, start)
        return outputs

    def _tap(
        self, active: ActiveModel, inputs: Mapping[str, np.ndarray], outputs: dict[str, np.ndarray] | None, start: float
    ) -> None:
        taps = self._taps
        if not taps:
            return
        latency_ms = (time.perf_counter() - start) * 1000.0
        for tap in taps:
            try:
                tap(active, inputs, outputs, latency_ms)
            except Exception:  # an observer must never fail the caller's inference
                log.exception("inference tap failed")

    def _note(
        self,
        active: ActiveModel,
        start: float,
        inputs: Mapping[str, np.ndarray] | None = None,
        outputs: dict[str, np.ndarray] | None = None,
    ) -> None:
        if self._record is None:
            return
        latency_ms = (time.perf_counter() - start) * 1000.0
        if outputs is None:
            self._record(active.ref, latency_ms, False)
        else:
            self._record(
                active.ref, latency_ms, True, inputs, outputs, semantics=active.semantics, input_name=active.input_name
            )
