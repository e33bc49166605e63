"""The rollout state machine: `step(state, plan, observations, now) -> (state, actions, decisions)`, no IO.

One step applies operator commands, takes in the fleet (starting the rollout, or adding late
joiners), device reports and timeouts, moves the rollout along (wave done → bake → gates → next
wave), and dispatches devices within the download limit. It is deterministic: the same inputs give
the same outputs, which is what makes a restart safe (see `cloud.rollouts`).

Waves are 0-based indexes in the state and in decisions' fields, numbered from 1 in every message.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from cloud.rollouts._context import StepContext
from cloud.rollouts._devices import ROLLBACK, UPDATE, Track, check_timeouts, dispatch, ingest_report, next_due
from cloud.rollouts._devices import inflight_actions as _inflight
from cloud.rollouts.actions import Action, Wait
from cloud.rollouts.decisions import (
    BakeStarted,
    CommandRejected,
    Completed,
    ControlMismatch,
    Decision,
    DeviceJoined,
    GateFailed,
    GateInconclusive,
    GatePassed,
    GatesWaiting,
    RollbackFinished,
    RollbackStarted,
    RolloutAborted,
    RolloutPaused,
    RolloutResumed,
    RolloutStarted,
    WavePromoted,
    WaveSkipped,
    WaveStarted,
)
from cloud.rollouts.gates import COMPARATIVE_GATES, CohortStats, GateReport, control_mismatch, evaluate_gates
from cloud.rollouts.inputs import Abort, Command, Observations, Pause, Promote, Resume
from cloud.rollouts.plan import HELD_FOR_PROMOTION, RolloutPlan, assign_waves, promotion_target
from cloud.rollouts.state import TERMINAL, DevicePhase, DeviceRecord, RolloutState, RolloutStatus

__all__ = ["command_error", "gate_report", "inflight_actions", "step"]

_FINISHED = frozenset({DevicePhase.SUCCEEDED, DevicePhase.FAILED})
_DISPATCHING = frozenset({RolloutStatus.RUNNING, RolloutStatus.BAKING, RolloutStatus.COMPLETED})
_JUDGING = frozenset({RolloutStatus.RUNNING, RolloutStatus.BAKING})


def step(
    state: RolloutState, plan: RolloutPlan, observations: Observations, now: datetime
) -> tuple[RolloutState, list[Action], list[Decision]]:
    """Advance the rollout to `now`; the input state is not modified.

    Persist the returned state (and decisions) *before* executing the actions: a coordinator killed in
    between republishes `inflight_actions(state, plan)` on restart, and one killed before persisting
    re-runs this step and gets the same actions again.
    """
    if now.tzinfo is None:
        raise ValueError("`now` must be timezone-aware (UTC)")
    ctx = StepContext(state=_copy(state), plan=plan, now=now)
    for command in observations.commands:
        _apply_command(ctx, command)
    if observations.control is not None and observations.control.devices > 0:
        ctx.state.last_control = observations.control
    if observations.fleet is not None:
        _take_fleet(ctx, observations.fleet)
    for report in observations.reports:
        ingest_report(ctx, report)
    if ctx.state.status not in TERMINAL:
        check_timeouts(ctx)
    _advance(ctx, observations)
    if ctx.state.status not in _JUDGING:
        ctx.state.waiting = ctx.state.waiting_since = None  # nothing is judged, so nothing is waited for
    track = _dispatching_track(ctx.state)
    if track is UPDATE:
        current = ctx.state.current_wave
        dispatch(ctx, UPDATE, lambda record: record.wave <= current)
    elif track is ROLLBACK:
        dispatch(ctx, ROLLBACK, lambda record: True)
    _wait(ctx, track)
    return ctx.state, ctx.actions, ctx.decisions


def inflight_actions(state: RolloutState, plan: RolloutPlan) -> list[Action]:
    """Dispatch/Rollback actions of every attempt in flight: republish them after a restart (idempotent)."""
    return _inflight(state, plan)


def gate_report(state: RolloutState, plan: RolloutPlan, observations: Observations) -> GateReport:
    """The gates of the current wave as they stand, without changing anything (for status pages)."""
    return evaluate_gates(
        plan.gates_for(state.current_wave),
        _wave_stats(state, observations),
        _control_stats(state, observations),
        baseline=plan.baseline,
    )


def command_error(state: RolloutState, plan: RolloutPlan, command: Command) -> str | None:
    """Why `command` cannot be applied to `state` now, or None if it can (the API answers 409 with this)."""
    status = state.status
    if isinstance(command, Pause) and status not in {
        RolloutStatus.PENDING,
        RolloutStatus.RUNNING,
        RolloutStatus.BAKING,
    }:
        return f"cannot pause a {status.value} rollout"
    if isinstance(command, Resume) and status is not RolloutStatus.PAUSED:
        return f"cannot resume a {status.value} rollout: it is not paused"
    if isinstance(command, Promote):
        waves = {RolloutStatus.RUNNING, RolloutStatus.BAKING}
        if status not in waves and not (status is RolloutStatus.PAUSED and state.paused_from in waves):
            return f"cannot promote a {status.value} rollout: no wave is under way"
        try:
            promotion_target(
                plan, len(state.devices), state.current_wave, to_wave=command.to_wave, to_percent=command.to_percent
            )
        except ValueError as exc:
            return f"cannot promote: {exc}"
    if isinstance(command, Abort):
        if command.rollback:
            if plan.previous_version is None:
                return "cannot roll back: the plan names no previous_version"
            if status in {RolloutStatus.ROLLING_BACK, RolloutStatus.ROLLED_BACK}:
                return f"the rollout is already {status.value}"
        elif status in TERMINAL:
            return f"the rollout is already {status.value}"
    return None


# --- commands -----------------------------------------------------------------------------------


def _apply_command(ctx: StepContext, command: Command) -> None:
    state = ctx.state
    if command.command_id in state.applied_commands:
        return  # a replay after a restart: applied once already
    state.applied_commands.append(command.command_id)
    if why := command_error(state, ctx.plan, command):
        ctx.decide(
            CommandRejected,
            f"{command.kind} by {command.by} rejected: {why}",
            command_id=command.command_id,
            command=command.kind,
        )
    elif isinstance(command, Pause):
        _pause(ctx, command.reason, command.by)
    elif isinstance(command, Resume):
        state.status, state.paused_from, state.reason = state.paused_from or RolloutStatus.RUNNING, None, None
        if state.status is RolloutStatus.BAKING:
            state.bake_started_at = ctx.now  # the bake starts over: gates judge fresh data
        ctx.decide(RolloutResumed, f"resumed by {command.by}: {state.status.value}", by=command.by)
    elif isinstance(command, Promote):
        _promote(ctx, command)
    else:
        ctx.decide(RolloutAborted, f"aborted by {command.by}: {command.reason}", reason=command.reason, by=command.by)
        if command.rollback:
            _start_rollback(ctx, f"{command.reason} (by {command.by})")
        else:
            state.status, state.reason = RolloutStatus.ABORTED, command.reason


def _promote(ctx: StepContext, command: Promote) -> None:
    """Start the promotion's target wave now; the current wave and any in between skip their bakes and gates."""
    state, plan, wave = ctx.state, ctx.plan, ctx.state.current_wave
    target = promotion_target(plan, len(state.devices), wave, to_wave=command.to_wave, to_percent=command.to_percent)
    if target == wave + 1:
        message = f"wave {wave + 1} promoted by {command.by}: bake and gates skipped"
    else:
        message = (
            f"waves {wave + 1}-{target} promoted by {command.by} to wave {target + 1}: "
            f"bakes and gates skipped, their devices install along with wave {target + 1}"
        )
    ctx.decide(WavePromoted, message, wave=wave, to_wave=target, by=command.by)
    state.paused_from = state.reason = None
    _enter_wave(ctx, target)


def _pause(ctx: StepContext, reason: str, by: str) -> None:
    state = ctx.state
    state.paused_from, state.status, state.reason = state.status, RolloutStatus.PAUSED, reason
    ctx.decide(RolloutPaused, f"paused by {by}: {reason}", reason=reason, by=by)


def _start_rollback(ctx: StepContext, reason: str) -> None:
    """Send every device the rollout touched back to the previous version (those never sent anything stay)."""
    state = ctx.state
    for record in state.devices.values():
        touched = record.phase is not DevicePhase.PENDING or record.attempts > 0
        if touched and record.phase in {DevicePhase.PENDING, DevicePhase.DISPATCHED, *_FINISHED}:
            record.phase, record.dispatched_at, record.next_retry_at = DevicePhase.ROLLBACK_PENDING, None, None
    count = sum(1 for r in state.devices.values() if r.phase in {ROLLBACK.waiting, ROLLBACK.in_flight})
    state.status, state.paused_from, state.reason = RolloutStatus.ROLLING_BACK, None, reason
    ctx.decide(
        RollbackStarted,
        f"rolling {count} devices back to {ctx.plan.previous_version}: {reason}",
        reason=reason,
        devices=count,
    )


def _copy(state: RolloutState) -> RolloutState:
    """`state.model_copy(deep=True)`, at a tenth of the cost: a `DeviceRecord` holds immutable values only (ints,
    strings, enums, datetimes), so a shallow copy of each is a deep one (a deep copy of a 1,000-device state was a
    tenth of the runner's step)."""
    devices = {device_id: record.model_copy() for device_id, record in state.devices.items()}
    last_control = state.last_control.model_copy(deep=True) if state.last_control is not None else None
    return state.model_copy(
        update={"devices": devices, "last_control": last_control, "applied_commands": list(state.applied_commands)}
    )


# --- fleet and waves ----------------------------------------------------------------------------


def _take_fleet(ctx: StepContext, fleet: dict[str, dict[str, str]]) -> None:
    """Start a pending rollout on the selected devices, or add late joiners to the current wave."""
    state, plan = ctx.state, ctx.plan
    if state.status is RolloutStatus.PAUSED and state.paused_from is RolloutStatus.PENDING:
        return  # paused before it started: it starts on the fleet seen after resume
    selected = plan.selector.select(state.rollout_id, fleet)
    if state.status is RolloutStatus.PENDING:
        assignment = assign_waves(plan, state.rollout_id, selected)
        state.devices = {device_id: DeviceRecord(wave=wave) for device_id, wave in sorted(assignment.items())}
        sizes = [sum(1 for w in assignment.values() if w == i) for i in range(len(plan.waves))]
        ctx.decide(
            RolloutStarted,
            f"rolling {plan.model}:{plan.version} out to {len(assignment)} of {len(fleet)} devices, waves {sizes}; "
            + plan.judged_on(),
            devices=len(assignment),
            wave_sizes=sizes,
        )
        _enter_wave(ctx, 0)
        return
    # A partial plan stays partial: devices it held back, and newcomers, are not taken in.
    if state.status in TERMINAL or state.status is RolloutStatus.ROLLING_BACK or plan.allow_partial:
        return
    for device_id in sorted(selected - state.devices.keys()):
        state.devices[device_id] = DeviceRecord(wave=state.current_wave, late_joiner=True)
        ctx.decide(
            DeviceJoined,
            f"{device_id} joined: wave {state.current_wave + 1}",
            device_id=device_id,
            wave=state.current_wave,
        )


def _enter_wave(ctx: StepContext, index: int) -> None:
    """Start wave `index` (skipping waves with no devices of their own), or complete the rollout."""
    state, plan = ctx.state, ctx.plan
    state.waiting = state.waiting_since = None
    while index < len(plan.waves) and not any(r.wave == index for r in state.devices.values()):
        ctx.decide(WaveSkipped, f"wave {index + 1} ({plan.waves[index].describe()}) adds no devices", wave=index)
        index += 1
    if index >= len(plan.waves):
        state.current_wave, state.status, state.bake_started_at = len(plan.waves) - 1, RolloutStatus.COMPLETED, None
        succeeded = sum(1 for r in state.devices.values() if r.phase is DevicePhase.SUCCEEDED)
        failed = sum(1 for r in state.devices.values() if r.phase is DevicePhase.FAILED)
        ctx.decide(
            Completed, f"completed: {succeeded} devices updated, {failed} failed", succeeded=succeeded, failed=failed
        )
        return
    state.current_wave, state.status = index, RolloutStatus.RUNNING
    state.wave_started_at, state.bake_started_at = ctx.now, None
    size = sum(1 for r in state.devices.values() if r.wave == index)
    ctx.decide(
        WaveStarted,
        f"wave {index + 1} ({plan.waves[index].describe()}) started: {size} devices",
        wave=index,
        devices=size,
    )


# --- progress -----------------------------------------------------------------------------------


def _advance(ctx: StepContext, observations: Observations) -> None:
    state = ctx.state
    if state.status is RolloutStatus.RUNNING:
        wave = [r for r in state.devices.values() if r.wave <= state.current_wave]
        if all(r.phase in _FINISHED for r in wave):
            until = ctx.now + timedelta(seconds=ctx.plan.waves[state.current_wave].bake_seconds)
            state.status, state.bake_started_at = RolloutStatus.BAKING, ctx.now
            ok = sum(1 for r in wave if r.phase is DevicePhase.SUCCEEDED)
            ctx.decide(
                BakeStarted,
                f"wave {state.current_wave + 1} installed ({ok} updated, {len(wave) - ok} failed); "
                f"baking until {until.isoformat()}",
                wave=state.current_wave,
                until=until,
                succeeded=ok,
                failed=len(wave) - ok,
            )
    if state.status in {RolloutStatus.RUNNING, RolloutStatus.BAKING}:
        _judge(ctx, observations)
    if state.status is RolloutStatus.ROLLING_BACK and not any(
        r.phase in {ROLLBACK.waiting, ROLLBACK.in_flight} for r in state.devices.values()
    ):
        done = sum(1 for r in state.devices.values() if r.phase is DevicePhase.ROLLED_BACK)
        failed = sum(1 for r in state.devices.values() if r.phase is DevicePhase.ROLLBACK_FAILED)
        state.status = RolloutStatus.ROLLED_BACK
        ctx.decide(RollbackFinished, f"rolled back: {done} devices, {failed} failed", rolled_back=done, failed=failed)


def _bake_end(state: RolloutState, plan: RolloutPlan) -> datetime:
    assert state.bake_started_at is not None  # set whenever the status is baking
    return state.bake_started_at + timedelta(seconds=plan.waves[state.current_wave].bake_seconds)


def _judge(ctx: StepContext, observations: Observations) -> None:
    """Gates of the current wave: a failure acts at once, even mid-wave; a pass only once the bake is over.

    Gates lacking data after the bake are re-checked until `max_data_wait_seconds` after it, then the rollout
    pauses; both moments are recorded, and so is a control cohort that cannot serve as a baseline.
    """
    state, plan, wave = ctx.state, ctx.plan, ctx.state.current_wave
    report = gate_report(state, plan, observations)
    if report.failed:
        ctx.decide(GateFailed, f"wave {wave + 1} gates failed: {report.summary()}", wave=wave, report=report)
        reason = "gate failed: " + ", ".join(r.name for r in report.failed)
        if plan.on_gate_failure == "rollback":
            _start_rollback(ctx, reason)
        else:
            _pause(ctx, reason, "gates")
        return
    mismatch = _check_control(ctx, observations, report)
    state.waiting = mismatch
    if state.status is not RolloutStatus.BAKING:
        return
    end = _bake_end(state, plan)
    if ctx.now < end:
        return
    if report.passed:
        summary = report.summary() or "no gates"
        ctx.decide(GatePassed, f"wave {wave + 1} gates passed: {summary}", wave=wave, report=report)
        if wave + 1 in plan.hold_after_waves:  # a person promotes the next wave (resume bakes and judges again)
            _pause(ctx, f"wave {wave + 1} passed its gates; {HELD_FOR_PROMOTION}", "plan")
            return
        _enter_wave(ctx, wave + 1)
        return
    wait = plan.max_data_wait_seconds
    until = end + timedelta(seconds=wait)
    missing = "; ".join(f"{r.name} ({r.reason})" for r in report.undecided)
    if ctx.now >= until:
        ctx.decide(
            GateInconclusive,
            f"wave {wave + 1} gates still lack data {wait:g} s after the bake (max_data_wait_seconds): {missing}",
            wave=wave,
            report=report,
        )
        _pause(ctx, f"insufficient data after waiting {wait:g} s: {missing}", "gates")
        return
    if state.waiting_since is None:  # the first step past the bake: say once what is missing and until when
        state.waiting_since = end
        ctx.decide(
            GatesWaiting,
            f"wave {wave + 1} baked, but gates lack data: {missing}; re-checked until {until.isoformat()} "
            f"(max_data_wait_seconds {wait:g}), then the rollout pauses",
            wave=wave,
            report=report,
            until=until,
        )
    names = ", ".join(r.name for r in report.undecided)
    state.waiting = f"gates {names} lack data; the rollout pauses at {until.isoformat()} unless it comes" + (
        f"; {mismatch}" if mismatch else ""
    )


def _check_control(ctx: StepContext, observations: Observations, report: GateReport) -> str | None:
    """Why the control cohort cannot decide the comparative gates still waiting for it (recorded once a wave)."""
    state, plan, wave = ctx.state, ctx.plan, ctx.state.current_wave
    if plan.baseline != "control" or not any(r.name in COMPARATIVE_GATES for r in report.undecided):
        return None
    if observations.control is None and state.last_control is None:
        return None  # nothing observed of the control cohort (not judging yet): nothing to say about it
    control = _control_stats(state, observations)
    why = control_mismatch(control, model=plan.model, version=plan.previous_version, target=plan.version)
    if why is None:
        return None
    if state.control_mismatch_wave != wave:
        state.control_mismatch_wave = wave
        expected = f"{plan.model}:{plan.previous_version}" if plan.previous_version else plan.model
        ctx.decide(
            ControlMismatch,
            f"wave {wave + 1}: the comparative gates cannot decide: {why}. They wait until "
            f"max_data_wait_seconds ({plan.max_data_wait_seconds:g}) after the bake, then the rollout pauses; "
            "a first rollout of a model is judged on absolute limits (baseline: absolute, CLI --baseline absolute)",
            wave=wave,
            runs=control.runs,
            expected=expected,
        )
    return why


def _wave_stats(state: RolloutState, observations: Observations) -> CohortStats:
    """The updated cohort's telemetry, with install figures of the current wave from the engine's records.

    Install failure rate = devices of the current wave that gave up / devices of the current wave. Before
    the wave has finished this is a lower bound of its final value, so a failure found early is final.
    """
    wave = [r for r in state.devices.values() if r.wave == state.current_wave]
    failed = sum(1 for r in wave if r.phase is DevicePhase.FAILED)
    base = observations.wave or CohortStats(devices=len(state.updated_cohort()))
    return base.model_copy(update={"install_attempts": len(wave), "install_failures": failed})


def _control_stats(state: RolloutState, observations: Observations) -> CohortStats:
    """The control cohort's telemetry; once it is empty (the 100 % wave), the last one seen with devices."""
    control = observations.control
    if control is not None and control.devices > 0:
        return control
    return state.last_control or control or CohortStats()


def _dispatching_track(state: RolloutState) -> Track | None:
    if state.status in _DISPATCHING:
        return UPDATE
    return ROLLBACK if state.status is RolloutStatus.ROLLING_BACK else None


def _wait(ctx: StepContext, track: Track | None) -> None:
    """Ask to be woken at the next moment something is due, if nothing else wakes the engine first."""
    state = ctx.state
    if state.status in TERMINAL:
        return
    times = [t for t in (next_due(ctx, track),) if t is not None]
    if state.status is RolloutStatus.BAKING:
        end = _bake_end(state, ctx.plan)
        times.append(end if ctx.now < end else end + timedelta(seconds=ctx.plan.max_data_wait_seconds))
    future = [t for t in times if t > ctx.now]
    if future:
        ctx.actions.append(Wait(until=min(future)))
