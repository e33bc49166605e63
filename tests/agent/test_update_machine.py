"""The pure update state machine, as whole chains of events in table form."""

from __future__ import annotations

import pytest

from agent.update import (
    IN_PROGRESS,
    NEXT_PHASE,
    DesiredReceived,
    Event,
    Restarted,
    StepFailed,
    StepSucceeded,
    UpdateState,
    handle,
    transition_event,
)
from agent.update.machine import MAX_RESUMES
from protocol import ArtifactRef, DesiredState, ErrorCode, ErrorInfo, EventKind, ModelSpec, TensorSpec, UpdatePhase

P = UpdatePhase
OK = StepSucceeded()
BAD_DIGEST = StepFailed(ErrorInfo.of(ErrorCode.DIGEST_MISMATCH, "sha256 differs"))


def spec(version: str, digest: str) -> ModelSpec:
    return ModelSpec(
        name="digits",
        version=version,
        artifact=ArtifactRef(url=f"http://x/{version}", sha256=digest * 64, size=10),
        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 64])],
    )


V1, V2 = spec("1.0", "a"), spec("2.0", "b")


def desired(generation: int, model: ModelSpec | None, active: ModelSpec | None = None, **kw: object) -> DesiredReceived:
    state = DesiredState(device_id="dev-1", generation=generation, model=model)
    return DesiredReceived(desired=state, active=active.ref if active else None, **kw)  # type: ignore[arg-type]


def run(events: list[Event], start: UpdateState | None = None) -> list[UpdatePhase]:
    state = start or UpdateState()
    phases = []
    for event in events:
        state = handle(state, event)
        phases.append(state.phase)
    return phases


FULL = [P.DOWNLOADING, P.VERIFYING, P.STAGING, P.LOADING, P.WARMING_UP, P.SWITCHING, P.ACTIVE]

CHAINS = {
    "a_fresh_device_goes_through_every_step_to_active": ([desired(1, V1)] + [OK] * 6, FULL),
    "a_bad_digest_fails_at_verifying": (
        [desired(1, V1), OK, BAD_DIGEST, OK],
        [P.DOWNLOADING, P.VERIFYING, P.FAILED, P.FAILED],
    ),
    "a_failed_generation_is_not_retried_when_redelivered": (
        [desired(1, V1), BAD_DIGEST, desired(1, V1), desired(0, V1)],
        [P.DOWNLOADING, P.FAILED, P.FAILED, P.FAILED],
    ),
    "a_newer_generation_after_a_failure_starts_again": (
        [desired(1, V1), BAD_DIGEST, desired(2, V2)],
        [P.DOWNLOADING, P.FAILED, P.DOWNLOADING],
    ),
    "a_newer_generation_supersedes_an_update_in_progress": (
        [desired(1, V1), OK, OK, desired(2, V2), OK],
        [P.DOWNLOADING, P.VERIFYING, P.STAGING, P.DOWNLOADING, P.VERIFYING],
    ),
    "a_newer_generation_of_the_same_model_keeps_going": (
        [desired(1, V1), OK, OK, desired(2, V1), OK],
        [P.DOWNLOADING, P.VERIFYING, P.STAGING, P.STAGING, P.LOADING],
    ),
    "the_model_already_served_becomes_active_without_download": ([desired(1, V1, active=V1)], [P.ACTIVE]),
    "a_model_already_staged_in_the_inactive_slot_is_loaded_without_download": (
        [desired(1, V2, active=V1, staged=V2.ref), OK, OK, OK],
        [P.LOADING, P.WARMING_UP, P.SWITCHING, P.ACTIVE],
    ),
    "a_desired_state_without_model_is_idle": ([desired(1, None)], [P.IDLE]),
    "a_failure_after_active_changes_nothing": ([desired(1, V1, active=V1), BAD_DIGEST, OK], [P.ACTIVE] * 3),
    "the_warm_up_failing_reports_failed": (
        [desired(1, V1), OK, OK, OK, OK, StepFailed(ErrorInfo.of(ErrorCode.WARMUP_FAILED, "NaN"))],
        [P.DOWNLOADING, P.VERIFYING, P.STAGING, P.LOADING, P.WARMING_UP, P.FAILED],
    ),
}


@pytest.mark.parametrize(("events", "phases"), CHAINS.values(), ids=CHAINS.keys())
def test_update_chain(events: list[Event], phases: list[UpdatePhase]) -> None:
    assert run(events) == phases


def interrupted(phase: UpdatePhase, resumes: int = 0) -> UpdateState:
    return UpdateState(generation=3, phase=phase, target=V2, slot="b", resumes=resumes)


RESTARTS = {
    "interrupted_download_restarts_from_download": (
        interrupted(P.DOWNLOADING),
        Restarted(active=V1.ref),
        P.DOWNLOADING,
    ),
    "interrupted_staging_restarts_from_download": (interrupted(P.STAGING), Restarted(active=V1.ref), P.DOWNLOADING),
    "interrupted_loading_with_staged_file_resumes_at_loading": (
        interrupted(P.WARMING_UP),
        Restarted(active=V1.ref, staged=V2.ref),
        P.LOADING,
    ),
    "interrupted_loading_without_staged_file_downloads_again": (
        interrupted(P.LOADING),
        Restarted(active=V1.ref, staged=None),
        P.DOWNLOADING,
    ),
    "switch_that_reached_disk_is_active": (interrupted(P.SWITCHING), Restarted(active=V2.ref), P.ACTIVE),
    "an_update_interrupted_too_often_is_abandoned": (
        interrupted(P.LOADING, resumes=MAX_RESUMES),
        Restarted(active=V1.ref, staged=V2.ref),
        P.FAILED,
    ),
    "a_failed_update_stays_failed": (
        UpdateState(generation=3, phase=P.FAILED, target=V2),
        Restarted(active=V1.ref),
        P.FAILED,
    ),
    "an_active_model_missing_from_its_slot_is_fetched_again": (
        UpdateState(generation=3, phase=P.ACTIVE, target=V2, slot="b"),
        Restarted(active=None, active_slot="b"),
        P.DOWNLOADING,
    ),
    "an_active_model_found_in_its_slot_stays_active": (
        UpdateState(generation=3, phase=P.ACTIVE, target=V2, slot="b"),
        Restarted(active=V2.ref, active_slot="b"),
        P.ACTIVE,
    ),
}


@pytest.mark.parametrize(("state", "event", "phase"), RESTARTS.values(), ids=RESTARTS.keys())
def test_restart_decision(state: UpdateState, event: Restarted, phase: UpdatePhase) -> None:
    assert handle(state, event).phase == phase


def test_update_stages_into_the_inactive_slot() -> None:
    assert handle(UpdateState(), desired(1, V2, active=V1, active_slot="a")).slot == "b"
    assert handle(UpdateState(), desired(1, V2, active=V1, active_slot="b")).slot == "a"
    assert handle(UpdateState(), desired(1, V1)).slot == "a"


def test_failure_carries_the_error_and_a_resumed_update_counts_resumes() -> None:
    failed = handle(interrupted(P.VERIFYING), BAD_DIGEST)
    assert failed.error is not None and failed.error.code is ErrorCode.DIGEST_MISMATCH
    status = failed.status()
    assert status is not None and status.phase is P.FAILED and status.target == V2.ref
    assert handle(interrupted(P.STAGING, resumes=1), Restarted()).resumes == 2


def test_every_in_progress_phase_has_a_successor() -> None:
    assert set(NEXT_PHASE) == set(IN_PROGRESS)


@pytest.mark.parametrize(
    ("old", "new", "kind"),
    [
        (P.IDLE, P.DOWNLOADING, EventKind.UPDATE_STARTED),
        (P.DOWNLOADING, P.VERIFYING, EventKind.UPDATE_PROGRESS),
        (P.SWITCHING, P.ACTIVE, EventKind.UPDATE_ACTIVATED),
        (P.VERIFYING, P.FAILED, EventKind.UPDATE_FAILED),
        (P.ACTIVE, P.IDLE, None),
    ],
)
def test_transition_event(old: UpdatePhase, new: UpdatePhase, kind: EventKind | None) -> None:
    before, after = UpdateState(generation=1, phase=old), UpdateState(generation=1, phase=new)
    assert transition_event(before, after) == kind
