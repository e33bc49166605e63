"""The pure update state machine, as whole chains of events in table form."""

from __future__ import annotations

import pytest

from agent.update import (
    IN_PROGRESS,
    NEXT_PHASE,
    Booted,
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
SHADOW_REFUSED = StepFailed(ErrorInfo.of(ErrorCode.HEALTH_CHECK_FAILED, "disagrees on 40% of rows"))


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


FULL = [
    P.DOWNLOADING,
    P.VERIFYING,
    P.STAGING,
    P.LOADING,
    P.HEALTH_CHECK,
    P.SHADOW,
    P.SWITCHING,
    P.COMMITTING,
    P.ACTIVE,
]

CHAINS = {
    "a_fresh_device_goes_through_every_step_to_active": ([desired(1, V1)] + [OK] * 8, FULL),
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
        [desired(1, V2, active=V1, staged=V2.ref), OK, OK, OK, OK, OK],
        [P.LOADING, P.HEALTH_CHECK, P.SHADOW, P.SWITCHING, P.COMMITTING, P.ACTIVE],
    ),
    "a_desired_state_without_model_is_idle": ([desired(1, None)], [P.IDLE]),
    "a_failure_after_active_changes_nothing": ([desired(1, V1, active=V1), BAD_DIGEST, OK], [P.ACTIVE] * 3),
    "the_warm_up_failing_reports_failed": (
        [desired(1, V1), OK, OK, OK, OK, StepFailed(ErrorInfo.of(ErrorCode.WARMUP_FAILED, "NaN"))],
        [P.DOWNLOADING, P.VERIFYING, P.STAGING, P.LOADING, P.HEALTH_CHECK, P.FAILED],
    ),
    "a_refused_shadow_run_fails_before_the_switch": (
        [desired(1, V2, active=V1, staged=V2.ref), OK, OK, SHADOW_REFUSED],
        [P.LOADING, P.HEALTH_CHECK, P.SHADOW, P.FAILED],
    ),
    "a_failed_trial_after_the_switch_rolls_back": (
        [desired(1, V2, active=V1, staged=V2.ref), OK, OK, OK, OK, SHADOW_REFUSED, OK],
        [P.LOADING, P.HEALTH_CHECK, P.SHADOW, P.SWITCHING, P.COMMITTING, P.ROLLED_BACK, P.ROLLED_BACK],
    ),
    "a_rolled_back_generation_is_not_retried_but_a_newer_one_is": (
        [desired(1, V2, active=V1, staged=V2.ref), OK, OK, OK, OK, SHADOW_REFUSED, desired(1, V2), desired(2, V2)],
        [P.LOADING, P.HEALTH_CHECK, P.SHADOW, P.SWITCHING, P.COMMITTING, P.ROLLED_BACK, P.ROLLED_BACK, P.DOWNLOADING],
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
        interrupted(P.HEALTH_CHECK),
        Restarted(active=V1.ref, staged=V2.ref),
        P.LOADING,
    ),
    "interrupted_loading_without_staged_file_downloads_again": (
        interrupted(P.LOADING),
        Restarted(active=V1.ref, staged=None),
        P.DOWNLOADING,
    ),
    "switch_that_reached_disk_is_active": (interrupted(P.SWITCHING), Restarted(active=V2.ref), P.ACTIVE),
    "interrupted_shadow_run_with_staged_file_resumes_at_loading": (
        interrupted(P.SHADOW),
        Restarted(active=V1.ref, staged=V2.ref),
        P.LOADING,
    ),
    "interrupted_staging_that_completed_resumes_at_loading": (
        interrupted(P.STAGING),
        Restarted(active=V1.ref, staged=V2.ref),
        P.LOADING,
    ),
    "a_trial_goes_on_after_a_restart": (interrupted(P.COMMITTING), Restarted(active=V2.ref), P.COMMITTING),
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


def booted(active_slot: str | None = "b", previous: ModelSpec | None = V1, max_boots: int = 3) -> Booted:
    return Booted(active_slot=active_slot, previous=previous.ref if previous else None, max_trial_boots=max_boots)


BOOTS = {
    "a_start_during_the_trial_counts_a_boot": (interrupted(P.COMMITTING), booted(), P.COMMITTING, 1),
    "a_switch_that_reached_disk_starts_the_trial": (interrupted(P.SWITCHING), booted(active_slot="b"), P.COMMITTING, 1),
    "a_switch_that_did_not_reach_disk_is_no_trial": (interrupted(P.SWITCHING), booted(active_slot="a"), P.SWITCHING, 0),
    "the_last_tolerated_start_keeps_the_trial": (
        UpdateState(generation=3, phase=P.COMMITTING, target=V2, slot="b", boots=2),
        booted(),
        P.COMMITTING,
        3,
    ),
    "one_start_too_many_rolls_back": (
        UpdateState(generation=3, phase=P.COMMITTING, target=V2, slot="b", boots=3),
        booted(),
        P.ROLLED_BACK,
        4,
    ),
    "too_many_starts_without_a_previous_model_keep_the_trial_model_and_fail": (
        UpdateState(generation=3, phase=P.COMMITTING, target=V2, slot="b", boots=3),
        booted(previous=None),
        P.FAILED,
        4,
    ),
    "a_committed_model_counts_no_boots": (
        UpdateState(generation=3, phase=P.ACTIVE, target=V2, slot="b"),
        booted(),
        P.ACTIVE,
        0,
    ),
    "an_update_before_the_switch_counts_no_boots": (interrupted(P.SHADOW), booted(active_slot="a"), P.SHADOW, 0),
}


@pytest.mark.parametrize(("state", "event", "phase", "boots"), BOOTS.values(), ids=BOOTS.keys())
def test_boot_counter(state: UpdateState, event: Booted, phase: UpdatePhase, boots: int) -> None:
    after = handle(state, event)
    assert (after.phase, after.boots) == (phase, boots)


def test_a_rollback_says_why_and_is_reported_as_a_failed_update() -> None:
    start = UpdateState(generation=3, phase=P.COMMITTING, target=V2, slot="b", boots=3)
    after = handle(start, booted())
    assert after.error is not None and after.error.code is ErrorCode.HEALTH_CHECK_FAILED
    assert "4 times" in after.error.message and "rolled back to digits:1.0" in after.error.message
    assert transition_event(start, after) is EventKind.UPDATE_FAILED
    assert not after.in_progress


def test_a_state_file_of_an_older_agent_in_warming_up_resumes_as_health_check() -> None:
    legacy = UpdateState.model_validate({"generation": 1, "phase": "warming_up", "target": V2.model_dump()})
    assert legacy.phase is P.HEALTH_CHECK and legacy.in_progress
