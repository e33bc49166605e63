"""The fleet summary: per device the active version, inference and error counts, and merged latency percentiles.

It reads the rollups (`cloud.telemetry.rollups`): the same sums as the raw windows, which retention deletes.
Counts are all-time sums the database adds up; latency percentiles merge the histograms of the last
`LATENCY_WINDOW` only, so the summary's cost does not grow with the history kept (400 days of rollups).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from pydantic import BaseModel
from sqlalchemy import func
from sqlmodel import Session, col, select

from cloud.models import Device, ModelVersion, TelemetryGapsPublic, in_fleet
from cloud.models.telemetry import TelemetryRollup
from cloud.telemetry.gaps import telemetry_health
from cloud.variant_policy import version_variants
from protocol.messages import utcnow
from protocol.telemetry import histogram_quantile, merge_histograms

__all__ = ["LATENCY_WINDOW", "Counted", "DeviceSummary", "FleetSummary", "fleet_summary", "summarise"]

LATENCY_WINDOW = timedelta(hours=24)  # the summary's latency percentiles are of the last day


class Counted(Protocol):
    """What the summary sums: a stored window or a rollup row of one device."""

    @property
    def device_id(self) -> str: ...
    @property
    def inference_count(self) -> int: ...
    @property
    def error_count(self) -> int: ...
    @property
    def latency_histogram(self) -> list[int]: ...


class DeviceSummary(BaseModel):
    """One device's line of the summary; latencies are bucket upper bounds in milliseconds."""

    device_id: str
    status: str
    model_name: str | None
    model_version: str | None
    # Which of the version's artifacts the device runs (matched by the digest it reports).
    variant: str | None = None
    inference_count: int
    error_count: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    # Reported holes in the device's chain of telemetry windows, and windows the device dropped (outbox full).
    telemetry_gaps: int = 0
    telemetry_dropped: int = 0


class FleetSummary(BaseModel):
    """Per-device lines and fleet-wide totals."""

    devices: list[DeviceSummary]
    device_count: int
    online_count: int
    # Devices not heard from since the coordinator started (status `unknown`): neither online nor offline.
    unknown_count: int = 0
    inference_count: int
    error_count: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None


def _finite(value: float | None) -> float | None:
    # JSON has no infinity; "above the last bucket" is reported as unknown rather than as a lie.
    return None if value is None or value == float("inf") else value


def summarise(
    devices: list[Device],
    windows: Sequence[Counted],
    variants: dict[str, str] | None = None,
    *,
    health: dict[str, tuple[int, TelemetryGapsPublic]] | None = None,
    totals: dict[str, tuple[int, int]] | None = None,
) -> FleetSummary:
    """Build the summary from device rows, their telemetry windows or rollups, variant names by artifact digest
    and their telemetry health (windows dropped, gaps: `cloud.telemetry.gaps.telemetry_health`). Pure.

    `totals` (device → inferences, errors), when given, are the counts; `windows` then only give latencies."""
    variants, health = variants or {}, health or {}
    by_device: dict[str, list[Counted]] = {}
    for window in windows:
        by_device.setdefault(window.device_id, []).append(window)
    lines = []
    for device in devices:
        own = by_device.get(device.id, [])
        histogram = merge_histograms(w.latency_histogram for w in own)
        lines.append(
            DeviceSummary(
                device_id=device.id,
                status=device.status,
                model_name=device.active_model_name,
                model_version=device.active_model_version,
                variant=variants.get(device.active_model_sha256 or ""),
                inference_count=totals.get(device.id, (0, 0))[0]
                if totals is not None
                else sum(w.inference_count for w in own),
                error_count=totals.get(device.id, (0, 0))[1] if totals is not None else sum(w.error_count for w in own),
                latency_p50_ms=_finite(histogram_quantile(histogram, 0.50)),
                latency_p95_ms=_finite(histogram_quantile(histogram, 0.95)),
                telemetry_gaps=health[device.id][1].count if device.id in health else 0,
                telemetry_dropped=health[device.id][0] if device.id in health else 0,
            )
        )
    fleet_histogram = merge_histograms(w.latency_histogram for w in windows)
    return FleetSummary(
        devices=lines,
        device_count=len(devices),
        online_count=sum(1 for d in devices if d.status == "online"),
        unknown_count=sum(1 for d in devices if d.status == "unknown"),
        inference_count=sum(line.inference_count for line in lines),
        error_count=sum(line.error_count for line in lines),
        latency_p50_ms=_finite(histogram_quantile(fleet_histogram, 0.50)),
        latency_p95_ms=_finite(histogram_quantile(fleet_histogram, 0.95)),
    )


@dataclass(frozen=True)
class _Latency:
    """A rollup's latency histogram (its counts are summed by the database instead)."""

    device_id: str
    latency_histogram: list[int]
    inference_count: int = 0
    error_count: int = 0


def fleet_summary(*, session: Session, now: datetime | None = None) -> FleetSummary:
    """The summary over every device of the fleet (decommissioned ones are out) and their telemetry rollups."""
    devices = list(session.exec(select(Device).where(in_fleet()).order_by(Device.id)))  # not decommissioned
    sums = select(
        TelemetryRollup.device_id,
        func.coalesce(func.sum(TelemetryRollup.inference_count), 0),
        func.coalesce(func.sum(TelemetryRollup.error_count), 0),
    ).group_by(TelemetryRollup.device_id)
    totals = {str(d): (int(i), int(e)) for d, i, e in session.exec(sums)}
    since = (now or utcnow()) - LATENCY_WINDOW
    recent = session.exec(
        select(TelemetryRollup.device_id, TelemetryRollup.latency_histogram).where(
            col(TelemetryRollup.bucket_start) >= since
        )
    )
    windows = [_Latency(str(d), list(h or [])) for d, h in recent]
    names = {d.active_model_name for d in devices if d.active_model_name}
    variants: dict[str, str] = {}
    if names:
        for record in session.exec(select(ModelVersion).where(col(ModelVersion.name).in_(names))):
            variants.update({v.sha256: v.name for v in version_variants(record)})
    return summarise(devices, windows, variants, health=telemetry_health(session), totals=totals)
