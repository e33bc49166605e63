"""The fleet summary: per device the active version, inference and error counts, and merged latency percentiles."""

from __future__ import annotations

from pydantic import BaseModel
from sqlmodel import Session, col, select

from cloud.models import Device, ModelVersion, TelemetryGapsPublic, TelemetryRecord, in_fleet
from cloud.telemetry.gaps import telemetry_health
from cloud.variant_policy import version_variants
from protocol.telemetry import histogram_quantile, merge_histograms

__all__ = ["DeviceSummary", "FleetSummary", "fleet_summary", "summarise"]


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
    windows: list[TelemetryRecord],
    variants: dict[str, str] | None = None,
    *,
    health: dict[str, tuple[int, TelemetryGapsPublic]] | None = None,
) -> FleetSummary:
    """Build the summary from device rows, their telemetry windows, variant names by artifact digest and their
    telemetry health (windows dropped, gaps: `cloud.telemetry.gaps.telemetry_health`). Pure."""
    variants, health = variants or {}, health or {}
    by_device: dict[str, list[TelemetryRecord]] = {}
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
                inference_count=sum(w.inference_count for w in own),
                error_count=sum(w.error_count for w in own),
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


def fleet_summary(*, session: Session) -> FleetSummary:
    """The summary over every device of the fleet (decommissioned ones are out) and their telemetry windows."""
    devices = list(session.exec(select(Device).where(in_fleet()).order_by(Device.id)))  # not decommissioned
    windows = list(session.exec(select(TelemetryRecord)))
    names = {d.active_model_name for d in devices if d.active_model_name}
    variants: dict[str, str] = {}
    if names:
        for record in session.exec(select(ModelVersion).where(col(ModelVersion.name).in_(names))):
            variants.update({v.sha256: v.name for v in version_variants(record)})
    return summarise(devices, windows, variants, health=telemetry_health(session))
