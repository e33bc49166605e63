"""Routes of approvals (read-only here): high-risk versions waiting for approvers, and one version's status."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from cloud.api.deps import CoordinatorDep, SessionDep
from cloud.services import approvals, registry
from cloud.services.approvals import ApprovalsPublic, ApprovalStatus
from protocol.messages import Name, Version

__all__ = ["router"]

router = APIRouter(tags=["governance"])


@router.get("/approvals", summary="High-risk versions not signed yet, with their approvals")
def list_approvals(session: SessionDep, coordinator: CoordinatorDep) -> ApprovalsPublic:
    """Every high-risk version awaiting its card, its approvals or its signature: who signed, who could."""
    data = approvals.list_approvals(session=session, threshold=coordinator.approval_threshold(session))
    return ApprovalsPublic(data=data, count=len(data))


@router.get("/models/{name}/versions/{version}/approvals", summary="The approval status of one version")
def version_approvals(
    name: Annotated[Name, Path()], version: Annotated[Version, Path()], session: SessionDep, coordinator: CoordinatorDep
) -> ApprovalStatus:
    """Approvals needed and given, who could still approve, and whether the version may be deployed (and why not)."""
    record = registry.get_model_version(session=session, name=name, version=version)
    return approvals.approval_status(session=session, record=record, threshold=coordinator.approval_threshold(session))
