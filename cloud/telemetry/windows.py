"""Telemetry windows: stored once per `(device, seq)` as they arrive, totals per device, a device's windows by seq."""

from __future__ import annotations

from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from cloud.models import TelemetryRecord, TelemetryWindowPublic
from cloud.services.enrolment import enrolled_device, require_device
from cloud.telemetry.gaps import window_stored
from protocol.messages import TelemetryWindow, utcnow

__all__ = ["device_telemetry", "ingest_telemetry", "telemetry_totals"]


def ingest_telemetry(*, session: Session, window: TelemetryWindow, live: bool = True) -> bool:
    """Store a window once per `(device_id, seq)`; False if it was a duplicate (QoS 1 redelivery, an outbox resend).

    `live=False`: the broker replays it from its store (sent before a restart), so it does not move `last_seen`.
    """
    device = enrolled_device(session=session, device_id=window.device_id)
    if live:
        device.last_seen = utcnow()
        session.add(device)
        session.commit()
    duplicate = select(TelemetryRecord.id).where(
        TelemetryRecord.device_id == window.device_id, TelemetryRecord.seq == window.seq
    )
    if session.exec(duplicate).first() is not None:
        return False
    model = window.model
    session.add(
        TelemetryRecord(
            device_id=window.device_id,
            seq=window.seq,
            prev_seq=window.prev_seq,
            window_start=window.window_start,
            window_end=window.window_end,
            model_name=model.name if model else None,
            model_version=model.version if model else None,
            model_sha256=model.sha256 if model else None,
            inference_count=window.inference_count,
            error_count=window.error_count,
            latency_histogram=list(window.latency_histogram),
            class_counts=dict(window.class_counts),
        )
    )
    try:
        session.commit()
    except IntegrityError:  # the unique constraint is the real guard; the select above only saves work
        session.rollback()
        return False
    window_stored(session, window)
    return True


def telemetry_totals(session: Session, device_ids: list[str] | None = None) -> dict[str, tuple[int, int, int]]:
    """device id → (inference count, error count, windows)."""
    statement = select(
        TelemetryRecord.device_id,
        func.coalesce(func.sum(TelemetryRecord.inference_count), 0),
        func.coalesce(func.sum(TelemetryRecord.error_count), 0),
        func.count(col(TelemetryRecord.id)),
    ).group_by(TelemetryRecord.device_id)
    if device_ids is not None:
        statement = statement.where(col(TelemetryRecord.device_id).in_(device_ids))
    return {row[0]: (int(row[1]), int(row[2]), int(row[3])) for row in session.exec(statement)}


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
