"""Per-device rules of the engine: reading reports, timeouts, retries with backoff, dispatching within the limit.

A device moves along one of two tracks with the same shape — the update track (pending → dispatched →
succeeded | failed) and the rollback track (rollback_pending → rolling_back → rolled_back |
rollback_failed) — so both share these functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cloud.rollouts._context import StepContext
from cloud.rollouts.actions import Action, Dispatch, Rollback
from cloud.rollouts.decisions import DeviceFailed, DeviceRolledBack, DeviceTimedOut, DeviceUpdated, RetryScheduled
from cloud.rollouts.inputs import DeviceReport
from cloud.rollouts.plan import RolloutPlan, stable_fraction
from cloud.rollouts.state import IN_FLIGHT, DevicePhase, DeviceRecord, RolloutState
from protocol.messages import UpdatePhase

__all__ = ["ROLLBACK", "UPDATE", "Track", "check_timeouts", "dispatch", "inflight_actions", "ingest_report", "next_due"]


@dataclass(frozen=True)
class Track:
    """The phases of one direction of travel."""

    waiting: DevicePhase
    in_flight: DevicePhase
    done: DevicePhase
    gave_up: DevicePhase
    rollback: bool

    def attempts(self, record: DeviceRecord) -> int:
        """Dispatches on this track so far."""
        return record.rollback_attempts if self.rollback else record.attempts


UPDATE = Track(DevicePhase.PENDING, DevicePhase.DISPATCHED, DevicePhase.SUCCEEDED, DevicePhase.FAILED, False)
ROLLBACK = Track(
    DevicePhase.ROLLBACK_PENDING, DevicePhase.ROLLING_BACK, DevicePhase.ROLLED_BACK, DevicePhase.ROLLBACK_FAILED, True
)


def _track_of(record: DeviceRecord) -> Track:
    return ROLLBACK if record.phase in {ROLLBACK.waiting, ROLLBACK.in_flight} else UPDATE


def _runs(report: DeviceReport, model: str, version: str | None) -> bool:
    return version is not None and report.active_model == model and report.active_version == version


def _settle(record: DeviceRecord, phase: DevicePhase) -> None:
    record.phase = phase
    record.dispatched_at = None
    record.next_retry_at = None


def ingest_report(ctx: StepContext, report: DeviceReport) -> None:
    """Apply one device report: success, or a failure of the attempt in flight (older reports are ignored)."""
    record = ctx.state.devices.get(report.device_id)
    if record is None:
        return
    plan, device_id = ctx.plan, report.device_id
    if record.phase in {DevicePhase.PENDING, DevicePhase.DISPATCHED} and _runs(report, plan.model, plan.version):
        # Whatever the attempt, the device runs the target: done (a pending device already on it is never sent it).
        _settle(record, DevicePhase.SUCCEEDED)
        ctx.decide(
            DeviceUpdated, f"{device_id} runs {plan.model}:{plan.version}", device_id=device_id, attempt=record.attempts
        )
        return
    if record.phase not in IN_FLIGHT or record.dispatched_at is None or report.at < record.dispatched_at:
        return  # nothing in flight, or a report from before this attempt was sent
    track = _track_of(record)
    expected = plan.previous_version if track.rollback else plan.version
    if track.rollback and _runs(report, plan.model, expected):
        _settle(record, DevicePhase.ROLLED_BACK)
        ctx.decide(DeviceRolledBack, f"{device_id} runs {plan.model}:{expected} again", device_id=device_id)
    elif report.update_phase is UpdatePhase.FAILED and report.target_version in (None, expected):
        fail_attempt(ctx, device_id, record, track, report.error or "the device reported a failed update")


def fail_attempt(ctx: StepContext, device_id: str, record: DeviceRecord, track: Track, why: str) -> None:
    """The attempt in flight failed: schedule the next one after a backoff, or give up after max_retries."""
    plan, attempts = ctx.plan, track.attempts(record)
    record.last_error = why
    what = "rollback" if track.rollback else "update"
    if attempts <= plan.max_retries:
        _settle(record, track.waiting)
        retry_at = ctx.now + timedelta(seconds=plan.retry_delay(attempts))
        record.next_retry_at = retry_at
        ctx.decide(
            RetryScheduled,
            f"{device_id}: {what} attempt {attempts} failed ({why}); attempt {attempts + 1} at {retry_at.isoformat()}",
            device_id=device_id,
            attempt=attempts + 1,
            retry_at=retry_at,
            rollback=track.rollback,
        )
    else:
        _settle(record, track.gave_up)
        ctx.decide(
            DeviceFailed,
            f"{device_id}: {what} failed after {attempts} attempts ({why})",
            device_id=device_id,
            attempts=attempts,
            error=why,
            rollback=track.rollback,
        )


def check_timeouts(ctx: StepContext) -> None:
    """Fail every attempt in flight for longer than `device_timeout_seconds`."""
    timeout = timedelta(seconds=ctx.plan.device_timeout_seconds)
    # The expired attempts first, then only those in id order: sorting the whole rollout's records every step was most
    # of a 1,000-device step's engine time (failing one attempt changes no other record, so the result is the same).
    expired = [
        (device_id, record)
        for device_id, record in ctx.state.devices.items()
        if record.phase in IN_FLIGHT and record.dispatched_at is not None and ctx.now >= record.dispatched_at + timeout
    ]
    for device_id, record in sorted(expired, key=lambda item: item[0]):
        track = _track_of(record)
        attempt = track.attempts(record)
        ctx.decide(
            DeviceTimedOut,
            f"{device_id}: no result {timeout.total_seconds():g} s after attempt {attempt}",
            device_id=device_id,
            attempt=attempt,
            rollback=track.rollback,
        )
        fail_attempt(ctx, device_id, record, track, f"timed out after {timeout.total_seconds():g} s")


def _action(plan: RolloutPlan, device_id: str, record: DeviceRecord, track: Track) -> Action:
    if track.rollback:
        assert plan.previous_version is not None  # a rollback is only started with a previous version
        return Rollback(
            device_id=device_id, model=plan.model, to_version=plan.previous_version, attempt=record.rollback_attempts
        )
    return Dispatch(device_id=device_id, model=plan.model, version=plan.version, attempt=record.attempts)


def dispatch(ctx: StepContext, track: Track, eligible: Callable[[DeviceRecord], bool]) -> None:
    """Send waiting devices whose retry time has come, in wave and stable rank order, up to the download limit."""
    state, now = ctx.state, ctx.now
    free = ctx.plan.max_concurrent_downloads - state.in_flight()
    if free <= 0:
        return
    ready = [
        (record.wave, stable_fraction(state.rollout_id, "wave", device_id), device_id)
        for device_id, record in state.devices.items()
        if record.phase is track.waiting
        and eligible(record)
        and (record.next_retry_at is None or record.next_retry_at <= now)
    ]
    for _, _, device_id in sorted(ready)[:free]:
        record = state.devices[device_id]
        record.phase, record.dispatched_at, record.next_retry_at = track.in_flight, now, None
        if track.rollback:
            record.rollback_attempts += 1
        else:
            record.attempts += 1
        ctx.actions.append(_action(ctx.plan, device_id, record, track))


def inflight_actions(state: RolloutState, plan: RolloutPlan) -> list[Action]:
    """The actions of every attempt in flight, to publish again after a restart (same attempt numbers)."""
    return [
        _action(plan, device_id, record, _track_of(record))
        for device_id, record in sorted(state.devices.items())
        if record.phase in IN_FLIGHT
    ]


def next_due(ctx: StepContext, dispatching: Track | None) -> datetime | None:
    """The earliest future time a device times out or (on the `dispatching` track) becomes due for a retry."""
    timeout = timedelta(seconds=ctx.plan.device_timeout_seconds)
    times = []
    for record in ctx.state.devices.values():
        if record.phase in IN_FLIGHT and record.dispatched_at is not None:
            times.append(record.dispatched_at + timeout)
        elif dispatching is not None and record.phase is dispatching.waiting and record.next_retry_at is not None:
            times.append(record.next_retry_at)
    future = [t for t in times if t > ctx.now]
    return min(future) if future else None
