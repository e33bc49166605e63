"""Where alert rules get their numbers: one function per source, reading the database, returning `Observation`s.

A source is `(session, now, settings) -> list[Observation]`; `SOURCES` is the list the runner evaluates. A new
kind of condition (drift, estimated accuracy) is one more function here, appended to `SOURCES`, and a `Rule`
reading its metric (`cloud.alerts.service.configured_rules`).

- `telemetry_observations`: per device and model, the error rate and the merged latency histogram of the
  telemetry windows that ended in the last `alert_window_s` seconds.
- `offline_observations`: enrolled devices that are not `online` (the fleet summary's word) and have not been
  heard from (`last_seen`, else their enrolment) for `alert_offline_after_s` seconds.
- `rollout_observations`: unfinished, unpaused rollouts and how long since their state last advanced, or since
  the end of the wait the engine planned, whichever is later.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from sqlmodel import Session, col, select

from cloud.alerts.drift import drift_observations
from cloud.alerts.rules import Aggregate, Observation
from cloud.models import Device, EnrolmentState, Rollout, TelemetryRecord, as_utc, in_fleet
from cloud.rollouts.state import RolloutStatus
from cloud.settings import Settings
from protocol.telemetry import merge_histograms

__all__ = [
    "ERROR_RATE",
    "LATENCY_P95_MS",
    "OFFLINE",
    "ROLLOUT_STALLED_S",
    "SOURCES",
    "Source",
    "offline_observations",
    "rollout_observations",
    "telemetry_observations",
]

ERROR_RATE = "error_rate"
LATENCY_P95_MS = "latency_p95_ms"
OFFLINE = "devices_offline"
ROLLOUT_STALLED_S = "rollout_stalled_s"

Source = Callable[[Session, datetime, Settings], list[Observation]]

# A rollout in one of these is expected to move by itself; paused ones wait for a person, finished ones for nothing.
_MOVING = frozenset(
    s.value for s in (RolloutStatus.PENDING, RolloutStatus.RUNNING, RolloutStatus.BAKING, RolloutStatus.ROLLING_BACK)
)


def telemetry_observations(session: Session, now: datetime, settings: Settings) -> list[Observation]:
    """Error rate and latency histogram per device and model over the recent windows of fleet devices."""
    since = now - timedelta(seconds=settings.alert_window_s)
    rows = session.exec(
        select(TelemetryRecord, Device.tags)
        .join(Device, col(Device.id) == col(TelemetryRecord.device_id))
        .where(in_fleet(), col(TelemetryRecord.window_end) >= since)
    )
    totals: dict[tuple[str, str | None], tuple[int, int, list[int], dict[str, str]]] = {}
    for window, tags in rows:
        key = (window.device_id, window.model_name)
        inferences, errors, histogram, _ = totals.get(key, (0, 0, [], {}))
        totals[key] = (
            inferences + window.inference_count,
            errors + window.error_count,
            merge_histograms([histogram, window.latency_histogram]) if histogram else list(window.latency_histogram),
            dict(tags or {}),
        )
    observations: list[Observation] = []
    for (device_id, model), (inferences, errors, histogram, tags) in sorted(totals.items(), key=lambda i: str(i[0])):
        if inferences <= 0:
            continue
        rate = min(errors, inferences) / inferences
        for metric, value, how in ((ERROR_RATE, rate, Aggregate.MEAN), (LATENCY_P95_MS, 0.0, Aggregate.P95)):
            observations.append(
                Observation(
                    metric,
                    value,
                    how,
                    weight=float(inferences),
                    device_id=device_id,
                    tags=tags,
                    model=model,
                    histogram=tuple(histogram) if how is Aggregate.P95 else (),
                )
            )
    return observations


def offline_observations(session: Session, now: datetime, settings: Settings) -> list[Observation]:
    """Enrolled devices not online and silent for `alert_offline_after_s`; the value is how long, in seconds."""
    devices = session.exec(
        select(Device).where(Device.enrolment == EnrolmentState.ENROLLED.value, col(Device.status) != "online")
    )
    observations = []
    for device in devices:
        heard = as_utc(device.last_seen) or as_utc(device.enrolled_at) or as_utc(device.first_seen)
        silent_s = (now - heard).total_seconds() if heard is not None else float("inf")
        if silent_s >= settings.alert_offline_after_s:
            value = min(silent_s, 10.0**12)
            observations.append(Observation(OFFLINE, value, Aggregate.COUNT, device_id=device.id, tags=device.tags))
    return observations


def rollout_observations(session: Session, now: datetime, settings: Settings) -> list[Observation]:
    """Seconds each moving rollout has not advanced (not counting a wait its engine planned)."""
    observations = []
    for row in session.exec(select(Rollout).where(col(Rollout.status).in_(sorted(_MOVING)))):
        moved = as_utc(row.updated_at) or now
        planned = as_utc(row.next_step_at)
        since = max(moved, planned) if planned is not None else moved
        observations.append(
            Observation(
                ROLLOUT_STALLED_S,
                max(0.0, (now - since).total_seconds()),
                Aggregate.MAX,
                model=row.model_name,
                cohort=f"rollout={row.id}",
            )
        )
    return observations


SOURCES: list[Source] = [telemetry_observations, offline_observations, rollout_observations, drift_observations]
