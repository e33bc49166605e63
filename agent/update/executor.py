"""The thin IO side of the update path: one step function per phase, in a table.

Each step does its IO and raises an `UpdateError` on failure; `UpdateExecutor.run` turns the outcome
into the event the pure core (`machine.handle`) decides on. The previous model keeps serving until the
switching step, which persists the new active slot first and then swaps the served model; the
committing step then watches the switched model on trial, and `roll_back` restores the previous slot.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from agent.errors import (
    AgentError,
    ArtifactVerificationError,
    HealthCheckError,
    InvalidModelError,
    StorageError,
    WarmupError,
)
from agent.runtime import RuntimeCatalog, warmup_inputs
from agent.serving import ActiveModel, Serving
from agent.update.cancel import StepCancelledError
from agent.update.fetch import ArtifactFetcher
from agent.update.health import HealthPolicy, check_outputs
from agent.update.machine import StepFailed, StepSucceeded, other_slot
from agent.update.shadow import TrialWatch, run_shadow
from agent.update.slots import SlotStore
from agent.update.state import UpdateState
from protocol import ErrorCode, ErrorInfo, ModelSpec, UpdatePhase, VerificationError, verify_artifact

__all__ = ["UpdateExecutor", "load_model"]

log = logging.getLogger(__name__)

Step = Callable[[UpdateState, ModelSpec, Callable[[], bool]], None]


def load_model(catalog: RuntimeCatalog, spec: ModelSpec, path: Path) -> ActiveModel:
    """Load `path` with the runtime for its format and check it takes the declared inputs."""
    model = catalog.for_format(spec.artifact.format).load(path)
    declared = {t.name for t in spec.inputs}
    actual = {t.name for t in model.inputs}
    if declared != actual:
        raise InvalidModelError(
            f"model {spec.name}:{spec.version} takes inputs {sorted(actual)}, "
            f"the deployment declares {sorted(declared)}"
        )
    return ActiveModel(spec=spec, model=model)


class UpdateExecutor:
    """Runs the step of the current phase; keeps the loaded candidate between loading and switching."""

    def __init__(
        self,
        *,
        slots: SlotStore,
        downloads: Path,
        catalog: RuntimeCatalog,
        serving: Serving,
        fetcher: ArtifactFetcher,
        policy: HealthPolicy | None = None,
    ) -> None:
        self._policy = policy or HealthPolicy()
        self._slots = slots
        self._downloads = downloads
        self._catalog = catalog
        self._serving = serving
        self._fetcher = fetcher
        self._candidate: ActiveModel | None = None
        self._trial: TrialWatch | None = None
        self._steps: dict[UpdatePhase, Step] = {
            UpdatePhase.DOWNLOADING: self._download,
            UpdatePhase.VERIFYING: self._verify,
            UpdatePhase.STAGING: self._stage,
            UpdatePhase.LOADING: self._load,
            UpdatePhase.HEALTH_CHECK: self._health_check,
            UpdatePhase.SHADOW: self._shadow,
            UpdatePhase.SWITCHING: self._switch,
            UpdatePhase.COMMITTING: self._commit,
        }

    @property
    def phases(self) -> frozenset[UpdatePhase]:
        """The phases this executor has a step for."""
        return frozenset(self._steps)

    def run(self, state: UpdateState, cancelled: Callable[[], bool]) -> StepSucceeded | StepFailed | None:
        """Do the step of `state.phase`; None when it was cancelled (state unchanged, resumable)."""
        step = self._steps.get(state.phase)
        if step is None or state.target is None:
            return StepFailed(ErrorInfo.of(ErrorCode.INTERNAL, f"no step for phase {state.phase.value} without target"))
        try:
            step(state, state.target, cancelled)
        except StepCancelledError as exc:
            log.info("update to generation %s paused: %s", state.generation, exc)
            return None
        except AgentError as exc:
            self._candidate = None
            return StepFailed(exc.error_info())
        except Exception as exc:  # a bug in a step must fail the update, not kill the worker
            log.exception("update step %s crashed", state.phase.value)
            self._candidate = None
            return StepFailed(ErrorInfo.of(ErrorCode.INTERNAL, f"{state.phase.value}: {type(exc).__name__}: {exc}"))
        return StepSucceeded()

    def _part(self, spec: ModelSpec) -> Path:
        return self._downloads / f"{spec.artifact.sha256}.part"

    def _download(self, state: UpdateState, spec: ModelSpec, cancelled: Callable[[], bool]) -> None:
        part = self._part(spec)
        # Leftovers of superseded updates would otherwise pile up on a small device's disk.
        for stale in self._downloads.glob("*.part"):
            if stale != part:
                with contextlib.suppress(OSError):
                    stale.unlink()
        self._fetcher.fetch(spec.artifact.url, part, expected_size=spec.artifact.size, cancelled=cancelled)

    def _verify(self, state: UpdateState, spec: ModelSpec, cancelled: Callable[[], bool]) -> None:
        part = self._part(spec)
        try:
            verify_artifact(part, spec.artifact)
            return
        except VerificationError as exc:
            # The file may have been resumed across restarts or damaged on disk: fetch it once more from
            # scratch before calling the artifact itself bad.
            log.warning("%s; downloading %s:%s once more from scratch", exc, spec.name, spec.version)
        except OSError as exc:
            raise StorageError(f"cannot read the downloaded artifact: {exc}") from exc
        with contextlib.suppress(OSError):
            part.unlink()
        self._download(state, spec, cancelled)
        try:
            verify_artifact(part, spec.artifact)
        except VerificationError as exc:
            with contextlib.suppress(OSError):
                part.unlink()  # the bytes are bad; a later attempt must download again
            raise ArtifactVerificationError(f"{exc} (downloaded twice)", code=exc.code) from exc
        except OSError as exc:
            raise StorageError(f"cannot read the downloaded artifact: {exc}") from exc

    def _stage(self, state: UpdateState, spec: ModelSpec, cancelled: Callable[[], bool]) -> None:
        slot = state.slot or self._slots.inactive_slot()
        part = self._part(spec)
        self._slots.stage(slot, part, spec)
        with contextlib.suppress(OSError):
            part.unlink()

    def _load(self, state: UpdateState, spec: ModelSpec, cancelled: Callable[[], bool]) -> None:
        content = self._slots.read(state.slot or self._slots.inactive_slot(), verify=False)
        if content is None or content.ref != spec.ref:
            raise StorageError(f"slot {state.slot} does not hold {spec.name}:{spec.version} any more")
        self._candidate = load_model(self._catalog, spec, content.path)

    def _health_check(self, state: UpdateState, spec: ModelSpec, cancelled: Callable[[], bool]) -> None:
        """The declared warm-up input (zeros, dynamic dims = 1): outputs declared, finite, of the declared shape."""
        candidate = self._require_candidate(spec)
        try:
            outputs = candidate.model.infer(warmup_inputs(spec.inputs))
        except AgentError as exc:
            raise WarmupError(f"health check: the warm-up inference failed: {exc}") from exc
        problem = check_outputs(spec.outputs, outputs)
        if problem is not None:
            raise WarmupError(f"health check: on the warm-up input, {problem}")

    def _shadow(self, state: UpdateState, spec: ModelSpec, cancelled: Callable[[], bool]) -> None:
        candidate = self._require_candidate(spec)
        problem = run_shadow(self._serving, candidate, self._policy, cancelled)
        if problem is not None:
            self._candidate = None
            raise HealthCheckError(f"shadow run: {problem}")

    def _switch(self, state: UpdateState, spec: ModelSpec, cancelled: Callable[[], bool]) -> None:
        candidate = self._require_candidate(spec)
        if state.slot is None:
            raise StorageError("no slot recorded for the staged model")
        watch = self._watch_trial(spec)  # before the swap: the trial's first request is watched too
        try:
            self._slots.activate(state.slot)  # on disk first: a restart from here on serves the new model
        except StorageError:
            watch.close()
            self._trial = None
            raise
        self._serving.swap(candidate)
        self._candidate = None

    def _commit(self, state: UpdateState, spec: ModelSpec, cancelled: Callable[[], bool]) -> None:
        watch = self._watch_trial(spec)  # after a restart the trial (and its clock) starts again here
        problem = watch.wait(self._policy, cancelled)  # when cancelled, the same watch goes on at the resume
        watch.close()
        self._trial = None
        if problem is not None:
            raise HealthCheckError(f"trial after the switch: {problem}")

    def _watch_trial(self, spec: ModelSpec) -> TrialWatch:
        if self._trial is not None and self._trial.trial != spec.ref:
            self._trial.close()
            self._trial = None
        if self._trial is None:
            self._trial = TrialWatch(self._serving, spec.ref)
        return self._trial

    def _require_candidate(self, spec: ModelSpec) -> ActiveModel:
        if self._candidate is None or self._candidate.ref != spec.ref:
            raise AgentError(f"{spec.name}:{spec.version} is not loaded (the loading step did not run)")
        return self._candidate

    def serve_active_slot(self) -> ErrorInfo | None:
        """Load the active slot's model and serve it; the error when the slot holds a model that will not load."""
        slot = self._slots.active_slot()
        if slot is None:
            return None
        content = self._slots.read(slot)
        if content is None:
            return ErrorInfo.of(ErrorCode.STORAGE_FAILED, f"the active slot {slot} holds no intact model")
        try:
            self._serving.swap(load_model(self._catalog, content.spec, content.path))
        except AgentError as exc:
            log.error("cannot load the active slot %s (%s)", slot, exc)
            return exc.error_info()
        return None

    def roll_back(self, state: UpdateState) -> None:
        """After `rolled_back`: point `slots/active` back at the previous slot and serve its model (idempotent)."""
        if state.slot is None:
            return
        previous = other_slot(state.slot)
        if self._slots.active_slot() == state.slot:
            self._slots.activate(previous)
        current = self._serving.current()
        content = self._slots.read(previous)
        if content is None or (current is not None and current.ref == content.ref):
            return
        try:
            self._serving.swap(load_model(self._catalog, content.spec, content.path))
        except AgentError as exc:
            log.error("cannot load the previous model from slot %s after the rollback: %s", previous, exc)
