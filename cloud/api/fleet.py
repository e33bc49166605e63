"""Routes of devices, deployments, the fleet summary and the bridge's counters."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, Field, model_validator

from cloud.api.deps import AdminDep, CoordinatorDep, SessionDep
from cloud.models import DeploymentPublic, DeploymentsPublic, DevicePublic, DevicesPublic, TelemetryWindowsPublic
from cloud.services import deployments, devices
from cloud.services.fleet import FleetSummary, fleet_summary
from protocol.messages import DeviceId, Name, Version

__all__ = ["DeploymentCreate", "DeploymentTargetSpec", "router"]

router = APIRouter()


class DeploymentTargetSpec(BaseModel):
    """Which devices: a list of ids, or tags every chosen device must carry."""

    device_ids: list[DeviceId] | None = Field(default=None, min_length=1, max_length=10_000)
    tags: dict[str, str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> DeploymentTargetSpec:
        if (self.device_ids is None) == (self.tags is None):
            raise ValueError("give exactly one of device_ids and tags")
        return self


class DeploymentCreate(BaseModel):
    """A deployment request: `model:version` to a target."""

    model: Name
    version: Version
    target: DeploymentTargetSpec


@router.get("/devices", tags=["devices"], summary="List devices")
def list_devices(session: SessionDep) -> DevicesPublic:
    """Every enrolled device with its reported state and telemetry totals."""
    data = devices.devices_public(session=session)
    return DevicesPublic(data=data, count=len(data))


@router.get("/devices/{device_id}", tags=["devices"], summary="One device")
def get_device(device_id: Annotated[DeviceId, Path()], session: SessionDep) -> DevicePublic:
    """A device with its reported state and telemetry totals."""
    return devices.get_device(session=session, device_id=device_id)


@router.get("/devices/{device_id}/telemetry", tags=["devices"], summary="A device's telemetry windows")
def get_device_telemetry(
    device_id: Annotated[DeviceId, Path()], session: SessionDep, limit: Annotated[int, Query(ge=1, le=10_000)] = 1000
) -> TelemetryWindowsPublic:
    """Stored windows by seq (each `(device, seq)` once, however often it was delivered)."""
    data = devices.device_telemetry(session=session, device_id=device_id, limit=limit)
    return TelemetryWindowsPublic(data=data, count=len(data))


@router.post(
    "/deployments", status_code=201, dependencies=[AdminDep], tags=["deployments"], summary="Create a deployment"
)
def create_deployment(body: DeploymentCreate, session: SessionDep, coordinator: CoordinatorDep) -> DeploymentPublic:
    """Raise the generation of every selected device and publish its desired state."""
    created = deployments.create_deployment(
        session=session,
        publisher=coordinator,
        public_url=coordinator.public_url,
        model=body.model,
        version=body.version,
        device_ids=body.target.device_ids,
        tags=body.target.tags,
    )
    assert created.id is not None
    return deployments.get_deployment(session=session, deployment_id=created.id)


@router.get("/deployments", tags=["deployments"], summary="List deployments, newest first")
def list_deployments(session: SessionDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> DeploymentsPublic:
    """Deployments with per-device progress."""
    data = deployments.list_deployments(session=session, limit=limit)
    return DeploymentsPublic(data=data, count=len(data))


@router.get("/deployments/{deployment_id}", tags=["deployments"], summary="One deployment")
def get_deployment(deployment_id: Annotated[int, Path(ge=1)], session: SessionDep) -> DeploymentPublic:
    """Per-device status and failure reasons."""
    return deployments.get_deployment(session=session, deployment_id=deployment_id)


@router.get("/fleet/summary", tags=["fleet"], summary="Fleet summary")
def get_fleet_summary(session: SessionDep) -> FleetSummary:
    """Per device: active version, inference and error counts, latency p50/p95; plus totals."""
    return fleet_summary(session=session)


@router.get("/stats", tags=["system"], summary="MQTT ingest counters")
def get_stats(coordinator: CoordinatorDep) -> dict[str, Any]:
    """Messages received, stored, rejected as malformed (per channel and `rejected_total`), duplicates dropped."""
    connected = coordinator.bridge is not None and coordinator.bridge.connected
    return {**coordinator.stats.snapshot(), "mqtt_connected": connected}
