"""Routes of quality-gated rollouts: create from a plan, list, show, and pause / resume / abort / promote.

A command is answered 409 with the engine's reason when it does not apply to the rollout's state. When
the coordinator's runner is running, the route waits briefly for the engine to take the command in and
answers 200 with the rollout as it then stands; otherwise (or if that takes longer) 202, command queued.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, Field, ValidationError

from cloud.api.deps import CoordinatorDep, PrincipalDep, SessionDep, requires
from cloud.auth import Role
from cloud.errors import InvalidInputError
from cloud.models import RolloutDetailPublic, RolloutsPublic
from cloud.rollouts import Abort, Command, Pause, Promote, Resume, RolloutPlan
from cloud.rollouts import service as rollouts
from cloud.services.aliases import MODEL_REF_PATTERN, resolve_version
from protocol.messages import Version

__all__ = ["AbortBody", "CommandAccepted", "PauseBody", "PromoteBody", "RolloutCreate", "router"]

_WRITE = requires(Role.OPERATOR)

router = APIRouter(tags=["rollouts"])

_COMMAND_WAIT_S = 5.0

RolloutId = Annotated[int, Path(ge=1, description="Rollout id.")]


class PauseBody(BaseModel):
    """Why the operator pauses."""

    reason: str = Field(default="paused by operator", max_length=1000)


class AbortBody(BaseModel):
    """Abort, and optionally send every touched device back to the plan's previous version."""

    rollback: bool = False
    reason: str = Field(default="aborted by operator", max_length=1000)


class PromoteBody(BaseModel):
    """Where to promote to: the next wave (no field), a later wave, or as far as a share of the devices allows.

    `wave_number` counts from 1, as the CLI shows waves; `to_percent` picks the furthest wave that keeps at
    most that share of the selected devices on the new version.
    """

    wave_number: int | None = Field(default=None, ge=1, description="Start this wave now (1 = the first wave).")
    to_percent: float | None = Field(default=None, gt=0, le=100, description="Promote up to this share of devices.")


class CommandAccepted(BaseModel):
    """A command stored for the engine, and the rollout as it stands."""

    command_id: str
    kind: str
    applied: bool
    rollout: RolloutDetailPublic


class RolloutCreate(RolloutPlan):
    """A rollout plan whose `model` may name an alias, `digits@production`, instead of a `version`."""

    model: Annotated[str, Field(pattern=MODEL_REF_PATTERN, description="Model name, or `name@alias` (no version).")]
    version: Version | None = None  # type: ignore[assignment]  # resolved before the plan is stored


def _resolved(body: RolloutCreate, session: SessionDep) -> RolloutPlan:
    """The plan with its alias resolved to the version it points at now (the rollout records that version)."""
    name, version, _ = resolve_version(session=session, model=body.model, version=body.version)
    try:
        return RolloutPlan.model_validate(body.model_dump() | {"model": name, "version": version})
    except ValidationError as exc:  # e.g. the alias points at the plan's previous_version
        raise InvalidInputError(f"{body.model}: {exc.errors()[0]['msg']}", field="version") from exc


@router.post("/rollouts", status_code=201, dependencies=[_WRITE], summary="Create a rollout from a plan")
def create_rollout(
    body: RolloutCreate, session: SessionDep, coordinator: CoordinatorDep, principal: PrincipalDep
) -> RolloutDetailPublic:
    """Store the plan (of a signed version); the runner starts the first wave at its next step."""
    plan = _resolved(body, session)
    coordinator.ensure_deployable(session, plan.model, plan.version)
    row = rollouts.create_rollout(session=session, plan=plan, actor=principal.name)
    if coordinator.rollouts is not None:
        coordinator.rollouts.wake()
    assert row.id is not None
    return rollouts.get_rollout(session=session, rollout_id=row.id)


@router.get("/rollouts", summary="List rollouts, newest first")
def list_rollouts(session: SessionDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> RolloutsPublic:
    """Rollouts with their status, current wave and devices by phase."""
    data = rollouts.list_rollouts(session=session, limit=limit)
    return RolloutsPublic(data=data, count=len(data))


@router.get("/rollouts/{rollout_id}", summary="One rollout with waves, devices, gates and decisions")
def get_rollout(
    rollout_id: RolloutId,
    session: SessionDep,
    decisions: Annotated[int, Query(ge=0, le=10_000, description="The latest decisions to include")] = 200,
    devices: Annotated[
        int | None,
        Query(
            ge=0,
            description="At most this many per-device rows, by device id (default: every device; 0 for a "
            "status poll: device_count and counts still say how many devices are in each phase)",
        ),
    ] = None,
) -> RolloutDetailPublic:
    """Per-wave progress, per-device states, the current gates' figures and the latest decisions."""
    return rollouts.get_rollout(session=session, rollout_id=rollout_id, decisions=decisions, devices=devices)


def _submit(
    rollout_id: int, command: Command, session: SessionDep, coordinator: CoordinatorDep, response: Response
) -> CommandAccepted:
    rollouts.queue_command(session=session, rollout_id=rollout_id, command=command, actor=command.by)
    runner = coordinator.rollouts
    applied = False
    if runner is not None:
        runner.wake()
        applied = runner.wait_applied(command.command_id, _COMMAND_WAIT_S)
    response.status_code = 200 if applied else 202
    session.expire_all()
    return CommandAccepted(
        command_id=command.command_id,
        kind=command.kind,
        applied=applied,
        rollout=rollouts.get_rollout(session=session, rollout_id=rollout_id),
    )


_COMMAND_RESPONSES: dict[int | str, dict[str, str]] = {
    202: {"description": "Queued; the engine applies it at its next step"},
    409: {"description": "The command does not apply to the rollout's state"},
}


@router.post(
    "/rollouts/{rollout_id}/pause", dependencies=[_WRITE], responses=_COMMAND_RESPONSES, summary="Pause a rollout"
)
def pause(
    rollout_id: RolloutId,
    session: SessionDep,
    coordinator: CoordinatorDep,
    principal: PrincipalDep,
    response: Response,
    body: PauseBody | None = None,
) -> CommandAccepted:
    """Stop dispatching; installs in flight still report."""
    reason = (body or PauseBody()).reason
    command = Pause(command_id=rollouts.new_command_id(), by=principal.name, reason=reason)
    return _submit(rollout_id, command, session, coordinator, response)


@router.post(
    "/rollouts/{rollout_id}/abort", dependencies=[_WRITE], responses=_COMMAND_RESPONSES, summary="Abort a rollout"
)
def abort(
    rollout_id: RolloutId,
    session: SessionDep,
    coordinator: CoordinatorDep,
    principal: PrincipalDep,
    response: Response,
    body: AbortBody | None = None,
) -> CommandAccepted:
    """Stop for good; with `rollback`, every device the rollout touched goes back to the previous version."""
    given = body or AbortBody()
    command = Abort(
        command_id=rollouts.new_command_id(), by=principal.name, rollback=given.rollback, reason=given.reason
    )
    return _submit(rollout_id, command, session, coordinator, response)


def _bodyless(name: str, make: Callable[[str, str], Command], summary: str, doc: str) -> None:
    """Add the route `POST /rollouts/{id}/<name>` of a command that takes no body."""

    def route(
        rollout_id: RolloutId,
        session: SessionDep,
        coordinator: CoordinatorDep,
        principal: PrincipalDep,
        response: Response,
    ) -> CommandAccepted:
        command = make(rollouts.new_command_id(), principal.name)
        return _submit(rollout_id, command, session, coordinator, response)

    route.__name__, route.__doc__ = name, doc
    router.post(
        f"/rollouts/{{rollout_id}}/{name}", dependencies=[_WRITE], responses=_COMMAND_RESPONSES, summary=summary
    )(route)


_bodyless(
    "resume",
    lambda command_id, by: Resume(command_id=command_id, by=by),
    "Resume a paused rollout",
    "Continue where it stopped; a bake in progress starts over.",
)


@router.post(
    "/rollouts/{rollout_id}/promote",
    dependencies=[_WRITE],
    responses=_COMMAND_RESPONSES,
    summary="Start the next wave, or a later one, now",
)
def promote(
    rollout_id: RolloutId,
    session: SessionDep,
    coordinator: CoordinatorDep,
    principal: PrincipalDep,
    response: Response,
    body: PromoteBody | None = None,
) -> CommandAccepted:
    """Skip the rest of the current wave's bake and gates (and those of the waves up to the target)."""
    given = body or PromoteBody()
    if given.wave_number is not None and given.to_percent is not None:
        raise InvalidInputError("promote to a wave_number or to_percent, not both", field="body")
    command = Promote(
        command_id=rollouts.new_command_id(),
        by=principal.name,
        to_wave=None if given.wave_number is None else given.wave_number - 1,
        to_percent=given.to_percent,
    )
    return _submit(rollout_id, command, session, coordinator, response)
