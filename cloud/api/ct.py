"""Routes of continuous training: per-model policies (operator sets, anyone reads) and the turns of the loop with
their approvals (operator; docs/drift.md)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Query
from pydantic import BaseModel

from cloud.api.deps import CoordinatorDep, PrincipalDep, SessionDep, requires
from cloud.auth import Role
from cloud.ct import service as ct
from cloud.ct.service import CtContext
from cloud.models import CtActionPublic, CtPolicyBase, CtPolicyPublic
from protocol.messages import Name

__all__ = ["router"]

_WRITE = requires(Role.OPERATOR)

router = APIRouter(prefix="/ct", tags=["continuous training"])


class CtStatus(BaseModel):
    """Every policy and the newest turns of the loop."""

    policies: list[CtPolicyPublic]
    actions: list[CtActionPublic]


class Rejection(BaseModel):
    """Why a person declines a step."""

    reason: str = ""


@router.get("", summary="Continuous-training policies and the newest turns of the loop")
def ct_status(
    session: SessionDep,
    model: Annotated[str | None, Query(max_length=128, description="Only this model's.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many turns, newest first.")] = 50,
) -> CtStatus:
    """Policies, and turns with their federated run, candidate, rollout and status."""
    policies = [p for p in ct.list_policies(session=session) if model is None or p.model_name == model]
    actions = ct.list_actions(session=session, model=model, limit=limit)
    return CtStatus(
        policies=[CtPolicyPublic.model_validate(p) for p in policies],
        actions=[CtActionPublic.model_validate(a) for a in actions],
    )


@router.put("/policies/{name}", dependencies=[_WRITE], summary="Set a model's continuous-training policy")
def put_policy(
    name: Annotated[Name, Path()], body: CtPolicyBase, session: SessionDep, principal: PrincipalDep
) -> CtPolicyPublic:
    """Create or replace the policy of model `name` (the body carries `model_name` too; the path's name wins)."""
    body = body.model_copy(update={"model_name": name})
    return CtPolicyPublic.model_validate(ct.set_policy(session=session, body=body, actor=principal.name))


@router.delete("/policies/{name}", status_code=204, dependencies=[_WRITE], summary="Remove a model's policy")
def delete_policy(name: Annotated[Name, Path()], session: SessionDep, principal: PrincipalDep) -> None:
    """Remove it (409 while one of its turns is unfinished)."""
    ct.delete_policy(session=session, model=name, actor=principal.name)


@router.post("/actions/{action_id}/approve", dependencies=[_WRITE], summary="Approve the step a turn waits for")
def approve(
    action_id: Annotated[int, Path(ge=1)], session: SessionDep, coordinator: CoordinatorDep, principal: PrincipalDep
) -> CtActionPublic:
    """Start the federated run the turn waits for (409 when it waits for nothing)."""
    context = CtContext.of(coordinator)
    row = ct.approve_action(session=session, action_id=action_id, actor=principal.name, context=context)
    return CtActionPublic.model_validate(row)


@router.post("/actions/{action_id}/reject", dependencies=[_WRITE], summary="Decline the step a turn waits for")
def reject(
    action_id: Annotated[int, Path(ge=1)],
    session: SessionDep,
    principal: PrincipalDep,
    body: Annotated[Rejection | None, Body()] = None,
) -> CtActionPublic:
    """End the turn (the alert stays open until the cohort recovers)."""
    reason = body.reason if body is not None else ""
    return CtActionPublic.model_validate(
        ct.reject_action(session=session, action_id=action_id, actor=principal.name, reason=reason)
    )
