"""Routes of devices: the enrolled devices with their reported state, a device's telemetry windows and events,
and decommissioning one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from cloud.api.deps import CoordinatorDep, PrincipalDep, SessionDep, requires
from cloud.auth import Role
from cloud.models import DeviceDetailPublic, DeviceEventsPublic, DevicesPublic, TelemetryWindowsPublic
from cloud.services import decommission, devices
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
def get_device(device_id: Annotated[DeviceId, Path()], session: SessionDep) -> DeviceDetailPublic:
    """A device with its reported state, telemetry totals and current certificate."""
    return devices.device_detail(session=session, device_id=device_id)


@router.get("/devices/{device_id}/telemetry", summary="A device's telemetry windows")
def get_device_telemetry(
    device_id: Annotated[DeviceId, Path()], session: SessionDep, limit: Annotated[int, Query(ge=1, le=10_000)] = 1000
) -> TelemetryWindowsPublic:
    """Stored windows by seq (each `(device, seq)` once, however often it was delivered)."""
    data = device_telemetry(session=session, device_id=device_id, limit=limit)
    return TelemetryWindowsPublic(data=data, count=len(data))


@router.get("/devices/{device_id}/events", summary="A device's events, newest last")
def get_device_events(
    device_id: Annotated[DeviceId, Path()],
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 200,
    after_id: Annotated[
        int | None, Query(ge=0, description="Only events after this event id, oldest first (the next page).")
    ] = None,
) -> DeviceEventsPublic:
    """Update progress, failures, enrolment, renewal, revocation and decommissioning of one device: the newest
    `limit` events, or with `after_id` the first `limit` after it."""
    data = devices.device_events(session=session, device_id=device_id, limit=limit, after_id=after_id)
    return DeviceEventsPublic(data=data, count=len(data))


@router.post(
    "/devices/{device_id}/decommission", dependencies=[requires(Role.OPERATOR)], summary="Decommission a device"
)
def decommission_device(
    device_id: Annotated[DeviceId, Path()], session: SessionDep, coordinator: CoordinatorDep, principal: PrincipalDep
) -> DeviceDetailPublic:
    """Revoke the device's certificates, clear its retained state and take it out of the fleet for good (its
    history stays); a device decommissioned already is answered as it is."""
    _, changed = decommission.decommission_device(
        session=session, pki=coordinator.fleet_pki(), device_id=device_id, by=principal.name
    )
    if changed:
        coordinator.after_revocation(device_id)
    return devices.device_detail(session=session, device_id=device_id)
