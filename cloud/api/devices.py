"""Routes of devices: the enrolled devices with their reported state, and a device's telemetry windows."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from cloud.api.deps import SessionDep
from cloud.models import DeviceEventsPublic, DevicePublic, DevicesPublic, TelemetryWindowsPublic
from cloud.services import devices
from cloud.telemetry import device_telemetry
from protocol.messages import DeviceId

__all__ = ["router"]

router = APIRouter(tags=["devices"])


@router.get("/devices", summary="List devices")
def list_devices(session: SessionDep) -> DevicesPublic:
    """Every enrolled device with its reported state and telemetry totals."""
    data = devices.devices_public(session=session)
    return DevicesPublic(data=data, count=len(data))


@router.get("/devices/{device_id}", summary="One device")
def get_device(device_id: Annotated[DeviceId, Path()], session: SessionDep) -> DevicePublic:
    """A device with its reported state and telemetry totals."""
    return devices.get_device(session=session, device_id=device_id)


@router.get("/devices/{device_id}/telemetry", summary="A device's telemetry windows")
def get_device_telemetry(
    device_id: Annotated[DeviceId, Path()], session: SessionDep, limit: Annotated[int, Query(ge=1, le=10_000)] = 1000
) -> TelemetryWindowsPublic:
    """Stored windows by seq (each `(device, seq)` once, however often it was delivered)."""
    data = device_telemetry(session=session, device_id=device_id, limit=limit)
    return TelemetryWindowsPublic(data=data, count=len(data))


@router.get("/devices/{device_id}/events", summary="A device's events, newest last")
def get_device_events(
    device_id: Annotated[DeviceId, Path()], session: SessionDep, limit: Annotated[int, Query(ge=1, le=10_000)] = 200
) -> DeviceEventsPublic:
    """Update progress, failures, enrolment, renewal and revocation of one device."""
    data = devices.device_events(session=session, device_id=device_id, limit=limit)
    return DeviceEventsPublic(data=data, count=len(data))
