"""What the rollout engine observes, read from the registry: the fleet, device reports and cohort telemetry.

The engine (`cloud.rollouts.step`) is pure; this module turns database rows into its `Observations`:

- **fleet**: every enrolled device id → its reported tags (selectors and late joiners);
- **reports**: the last reported state, as a `DeviceReport`, of each rollout device a report can still move
  (pending or in flight; settled devices are not read again). A report's update phase
  counts only when the device reported the *generation this rollout's attempt gave it*
  (`RolloutDispatchRecord`): a failure of another deployment, or of an earlier attempt, is not ours;
- **wave / control**: `CohortStats` of the updated cohort (windows of the target version) and of the
  control cohort (windows of the plan's previous version, or of any other version of the model when it
  names none) received since the current wave started, or since its bake began once it bakes, so the
  gates judge the new version on fresh data only. The control cohort also says what its devices serve
  (`runs`), so a control cohort on another model is named rather than silently waited for. Under an
  absolute baseline there is no control cohort to read.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import String, cast
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from cloud.models import Device, RolloutDispatchRecord, TelemetryRecord, as_utc, in_fleet
from cloud.rollouts import CohortStats, Command, DeviceReport, Observations, RolloutPlan, RolloutState, RolloutStatus
from cloud.rollouts.gates import NO_MODEL
from cloud.rollouts.state import IN_FLIGHT, DevicePhase, DeviceRecord
from protocol.messages import UpdatePhase
from protocol.telemetry import merge_histograms

__all__ = [
    "attempt_generations",
    "cohort_stats",
    "device_reports",
    "fleet_tags",
    "observe",
    "serving",
    "telemetry_since",
]

_JUDGED = frozenset({RolloutStatus.RUNNING, RolloutStatus.BAKING})
# Phases in which a device's report can change its record (`cloud.rollouts._devices.ingest_report`).
_READS_REPORTS = frozenset({DevicePhase.PENDING, *IN_FLIGHT})


def fleet_tags(*, session: Session) -> dict[str, dict[str, str]]:
    """Every enrolled device id → its tags."""
    # Read every step: the tags as the JSON text the database holds, each distinct text decoded once (a fleet's
    # devices mostly share a few tag sets; decoding every device's tags was a sixth of a 1,000-device step).
    # `in_fleet`: never a decommissioned device.
    statement = sa_select(col(Device.id), cast(col(Device.tags), String)).where(in_fleet())
    decoded: dict[str | None, dict[str, str]] = {}
    fleet: dict[str, dict[str, str]] = {}
    for device_id, text in session.execute(statement):
        tags = decoded.get(text)
        if tags is None:
            tags = decoded[text] = dict(json.loads(text) or {}) if text is not None else {}
        fleet[device_id] = dict(tags)
    return fleet


def attempt_generations(
    *, session: Session, rollout_id: int, device_ids: Sequence[str] | None = None
) -> dict[tuple[str, str, int], int]:
    """`(device_id, kind, attempt)` → the desired generation that attempt gave the device (of `device_ids` only)."""
    columns: tuple[Any, ...] = (
        RolloutDispatchRecord.device_id,
        RolloutDispatchRecord.kind,
        RolloutDispatchRecord.attempt,
        RolloutDispatchRecord.generation,
    )
    statement = sa_select(*columns).where(col(RolloutDispatchRecord.rollout_id) == rollout_id)
    if device_ids is not None:
        statement = statement.where(col(RolloutDispatchRecord.device_id).in_(list(device_ids)))
    return {(r.device_id, r.kind, r.attempt): r.generation for r in session.execute(statement)}


def device_reports(*, session: Session, rollout_id: int, state: RolloutState, plan: RolloutPlan) -> list[DeviceReport]:
    """The last reported state of every device of the rollout, as the engine reads reports."""
    # Only devices a report can still move (`ingest_report`): a settled device's reports are ignored, so reading
    # them again every tick made each step cost the whole rollout's size until its last device settled.
    listening = [device_id for device_id, record in state.devices.items() if record.phase in _READS_REPORTS]
    if not listening:
        return []
    in_flight = [device_id for device_id in listening if state.devices[device_id].phase in IN_FLIGHT]
    generations = attempt_generations(session=session, rollout_id=rollout_id, device_ids=in_flight)
    # Only the columns a report needs: whole rows would decode every device's JSON columns on every tick.
    columns: tuple[Any, ...] = (
        Device.id,
        Device.last_reported_at,
        Device.update_phase,
        Device.reported_generation,
        Device.active_model_name,
        Device.active_model_version,
        Device.last_error_message,
    )
    statement = sa_select(*columns).where(col(Device.id).in_(listening)).order_by(Device.id)
    rows: list[Any] = list(session.execute(statement))  # Rows: attribute access by column name
    reports = []
    for device in rows:
        at = as_utc(device.last_reported_at)
        if at is None:
            continue  # enrolled by an event or telemetry, never reported its state
        record = state.devices[device.id]
        phase = UpdatePhase(device.update_phase) if device.update_phase else None
        target: str | None = None
        generation = _attempt_generation(generations, device.id, record)
        if generation is not None and device.reported_generation == generation:
            # The report is about this attempt: it cannot predate it, whatever the device's clock says.
            target = plan.previous_version if record.phase is DevicePhase.ROLLING_BACK else plan.version
            if record.dispatched_at is not None:
                at = max(at, record.dispatched_at)
            if phase is UpdatePhase.ROLLED_BACK:
                phase = UpdatePhase.FAILED  # the agent's trial failed and it went back: the attempt failed
        else:
            phase = None  # about another generation: success is read from the active model alone
        reports.append(
            DeviceReport(
                device_id=device.id,
                at=at,
                active_model=device.active_model_name,
                active_version=device.active_model_version,
                update_phase=phase,
                target_version=target,
                error=device.last_error_message if phase is UpdatePhase.FAILED else None,
            )
        )
    return reports


def _attempt_generation(
    generations: dict[tuple[str, str, int], int], device_id: str, record: DeviceRecord
) -> int | None:
    """The generation of the attempt `record` has in flight, if any."""
    if record.phase is DevicePhase.DISPATCHED:
        return generations.get((device_id, "dispatch", record.attempts))
    if record.phase is DevicePhase.ROLLING_BACK:
        return generations.get((device_id, "rollback", record.rollback_attempts))
    return None


def telemetry_since(
    *,
    session: Session,
    device_ids: Sequence[str],
    model: str,
    since: datetime,
    version: str | None = None,
    other_than: str | None = None,
) -> list[TelemetryRecord]:
    """Windows of `model` from `device_ids` received at or after `since`, of `version` or of any but `other_than`."""
    if not device_ids:
        return []
    statement = select(TelemetryRecord).where(
        col(TelemetryRecord.device_id).in_(list(device_ids)),
        TelemetryRecord.model_name == model,
        col(TelemetryRecord.received_at) >= since,
    )
    if version is not None:
        statement = statement.where(TelemetryRecord.model_version == version)
    if other_than is not None:
        statement = statement.where(TelemetryRecord.model_version != other_than)
    return list(session.exec(statement))


def serving(*, session: Session, device_ids: Sequence[str]) -> dict[str, int]:
    """What the devices serve: `model:version` (or `none`) → how many of them."""
    if not device_ids:
        return {}
    statement = select(Device.active_model_name, Device.active_model_version).where(
        col(Device.id).in_(list(device_ids))
    )
    runs = Counter(f"{name}:{version}" if name else NO_MODEL for name, version in session.exec(statement))
    return dict(sorted(runs.items()))


def cohort_stats(
    windows: Sequence[TelemetryRecord], *, devices: int, runs: dict[str, int] | None = None
) -> CohortStats:
    """Sum stored telemetry windows into the figures of a cohort of `devices` devices (serving `runs`). Pure."""
    classes: dict[str, int] = {}
    for window in windows:
        for name, n in window.class_counts.items():
            classes[name] = classes.get(name, 0) + int(n)
    return CohortStats(
        devices=devices,
        inference_count=sum(w.inference_count for w in windows),
        error_count=sum(w.error_count for w in windows),
        latency_histogram=merge_histograms(w.latency_histogram for w in windows),
        class_counts=classes,
        runs=runs or {},
    )


def _judged_since(state: RolloutState) -> datetime | None:
    if state.status is RolloutStatus.BAKING:
        return state.bake_started_at
    return state.wave_started_at


def observe(
    *,
    session: Session,
    rollout_id: int,
    state: RolloutState,
    plan: RolloutPlan,
    commands: Sequence[Command] = (),
    with_fleet: bool = True,
    with_reports: bool = True,
) -> Observations:
    """Everything the engine needs for one step of rollout `rollout_id` (without the fleet, or without the device
    reports, for what reads the gates only: `cloud.rollouts.engine.gate_report` uses neither)."""
    wave = control = None
    since = _judged_since(state)
    if state.status in _JUDGED and since is not None:
        updated, untouched = state.updated_cohort(), state.control_cohort()
        wave_windows = telemetry_since(
            session=session, device_ids=updated, model=plan.model, since=since, version=plan.version
        )
        wave = cohort_stats(wave_windows, devices=len(updated))
        if plan.baseline == "control":
            control_windows = telemetry_since(
                session=session,
                device_ids=untouched,
                model=plan.model,
                since=since,
                version=plan.previous_version,
                other_than=None if plan.previous_version else plan.version,
            )
            runs = serving(session=session, device_ids=untouched)
            control = cohort_stats(control_windows, devices=len(untouched), runs=runs)
    return Observations(
        reports=device_reports(session=session, rollout_id=rollout_id, state=state, plan=plan) if with_reports else [],
        fleet=fleet_tags(session=session) if with_fleet else None,
        wave=wave,
        control=control,
        commands=list(commands),
    )
