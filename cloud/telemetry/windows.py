"""Telemetry windows: stored once per `(device, seq)` as they arrive, totals per device, a device's windows by seq."""

from __future__ import annotations

from sqlmodel import Session, col, select

from cloud.models import TelemetryRecord, TelemetryWindowPublic
from cloud.services.enrolment import UnknownDeviceError, require_device
from cloud.telemetry.ingest import Arrival, Outcome, store_windows
from cloud.telemetry.rollups import DEFAULT_BUCKET_S, rollup_totals
from protocol.messages import TelemetryWindow

__all__ = ["device_telemetry", "ingest_telemetry", "telemetry_totals"]


def ingest_telemetry(
    *, session: Session, window: TelemetryWindow, live: bool = True, bucket_s: int = DEFAULT_BUCKET_S
) -> bool:
    """Store a window once per `(device_id, seq)`; False if it was a duplicate (QoS 1 redelivery, an outbox resend).

    `live=False`: the broker replays it from its store (sent before a restart), so it does not move `last_seen`.
    `UnknownDeviceError` if its device is not enrolled. A batch of one of `cloud.telemetry.ingest.store_windows`.
    """
    [result] = store_windows(session, [Arrival(window, live)], bucket_s=bucket_s)
    if result.outcome is Outcome.REJECTED:
        raise UnknownDeviceError(result.reason)
    return result.outcome is Outcome.STORED


def telemetry_totals(session: Session, device_ids: list[str] | None = None) -> dict[str, tuple[int, int, int]]:
    """device id → (inference count, error count, windows), from the rollups (they outlive the raw windows)."""
    return rollup_totals(session, device_ids)


def device_telemetry(*, session: Session, device_id: str, limit: int = 1000) -> list[TelemetryWindowPublic]:
    """A device's stored telemetry windows by seq (the newest `limit`); `NotFoundError` if not enrolled."""
    require_device(session=session, device_id=device_id)
    statement = (
        select(TelemetryRecord)
        .where(TelemetryRecord.device_id == device_id)
        .order_by(col(TelemetryRecord.seq).desc())
        .limit(limit)
    )
    return [TelemetryWindowPublic.model_validate(w) for w in reversed(list(session.exec(statement)))]
