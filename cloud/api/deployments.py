"""Routes of deployments: set the desired model of chosen devices, and follow their progress."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, Field, model_validator

from cloud.api.deps import CoordinatorDep, PrincipalDep, SessionDep, requires
from cloud.auth import Role
from cloud.models import DeploymentPublic, DeploymentsPublic
from cloud.services import deployments
from cloud.services.aliases import MODEL_REF_PATTERN, resolve_version
from protocol.messages import DeviceId, Version

__all__ = ["DeploymentCreate", "DeploymentTargetSpec", "router"]

_WRITE = requires(Role.OPERATOR)

router = APIRouter(tags=["deployments"])


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
    """A deployment request: `model` and `version`, or `model@alias` without a version, to a target."""

    model: Annotated[
        str,
        Field(pattern=MODEL_REF_PATTERN, description="Model name, or `name@alias` (resolved now; omit `version`)."),
    ]
    version: Version | None = None
    target: DeploymentTargetSpec


@router.post("/deployments", status_code=201, dependencies=[_WRITE], summary="Create a deployment")
def create_deployment(
    body: DeploymentCreate, session: SessionDep, coordinator: CoordinatorDep, principal: PrincipalDep
) -> DeploymentPublic:
    """Raise the generation of every selected device and publish its desired state (signed versions only).

    An alias is resolved once, here: the deployment records the version it pointed at (and the alias).
    """
    name, version, alias = resolve_version(session=session, model=body.model, version=body.version)
    coordinator.ensure_deployable(session, name, version)
    created = deployments.create_deployment(
        session=session,
        publisher=coordinator,
        links=coordinator.links,
        model=name,
        version=version,
        device_ids=body.target.device_ids,
        tags=body.target.tags,
        actor=principal.name,
        alias=alias,
    )
    assert created.id is not None
    return deployments.get_deployment(session=session, deployment_id=created.id)


@router.get("/deployments", summary="List deployments, newest first")
def list_deployments(session: SessionDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> DeploymentsPublic:
    """Deployments with per-device progress."""
    data = deployments.list_deployments(session=session, limit=limit)
    return DeploymentsPublic(data=data, count=len(data))


@router.get("/deployments/{deployment_id}", summary="One deployment")
def get_deployment(deployment_id: Annotated[int, Path(ge=1)], session: SessionDep) -> DeploymentPublic:
    """Per-device status and failure reasons."""
    return deployments.get_deployment(session=session, deployment_id=deployment_id)
