"""Routes of federated runs: start one on a cohort of devices (operator), list and show them (any role), stop one
(operator), and the candidate builder's report of what it made of a run (operator; docs/federated.md)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from cloud.api.deps import CoordinatorDep, PrincipalDep, SessionDep, requires
from cloud.auth import Role
from cloud.federation import runs
from cloud.federation.nodes import eligible_node_ids
from cloud.federation.params import CandidateReport, FederatedRunCreate
from cloud.models import FederatedRunPublic, FederatedRunsPublic, RunStatus

__all__ = ["router"]

_WRITE = requires(Role.OPERATOR)

router = APIRouter(prefix="/federated/runs", tags=["federated"])

RunId = Annotated[int, Path(ge=1, description="Federated run id.")]


@router.post(
    "",
    status_code=201,
    dependencies=[_WRITE],
    summary="Start a federated run of a version on the devices a selector picks",
    responses={
        404: {"description": "Unknown model, version or alias."},
        409: {
            "description": "Federated learning is off, the version has no trainable form (or too big a one), or "
            "fewer than min_nodes devices are eligible (the detail counts why the others are not)."
        },
    },
)
def create_run(
    body: FederatedRunCreate, session: SessionDep, coordinator: CoordinatorDep, principal: PrincipalDep
) -> FederatedRunPublic:
    """Validate the request, choose the cohort and record a pending run; the coordinator's runner starts it."""
    row = runs.create_run(
        session=session,
        body=body,
        flower_enabled=coordinator.flower is not None,
        data_dir=coordinator.settings.data_dir,
        nodes=eligible_node_ids,
        actor=principal.name,
    )
    return runs.run_public(row)


@router.get("", summary="List federated runs")
def list_runs(
    session: SessionDep,
    model: Annotated[str | None, Query(max_length=128, description="Only runs of this model.")] = None,
    status: Annotated[RunStatus | None, Query(description="Only runs in this status.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many, newest first.")] = 100,
) -> FederatedRunsPublic:
    """Federated runs, newest first."""
    rows = runs.list_runs(session=session, model=model, status=status.value if status else None, limit=limit)
    return FederatedRunsPublic(data=[runs.run_public(r) for r in rows], count=len(rows))


@router.get("/{run_id}", summary="One federated run")
def get_run(run_id: RunId, session: SessionDep) -> FederatedRunPublic:
    """A run: its cohort, parameters (with the result directory), rounds so far, candidate and error."""
    return runs.run_public(runs.get_run(session=session, run_id=run_id))


@router.post(
    "/{run_id}/stop",
    dependencies=[_WRITE],
    summary="Stop a federated run",
    responses={409: {"description": "The run has finished."}, 503: {"description": "Flower did not take the stop."}},
)
def stop_run(
    run_id: RunId, session: SessionDep, coordinator: CoordinatorDep, principal: PrincipalDep
) -> FederatedRunPublic:
    """Cancel a pending run, stop a running one's Flower run, or end the building of its candidate."""
    row = runs.stop_run(session=session, run_id=run_id, flower=coordinator.flower, actor=principal.name)
    return runs.run_public(row)


@router.post(
    "/{run_id}/candidate",
    dependencies=[_WRITE],
    summary="Report the candidate built from a run (the candidate builder calls it)",
    responses={409: {"description": "The run is not building a candidate."}},
)
def report_candidate(
    run_id: RunId, body: CandidateReport, session: SessionDep, coordinator: CoordinatorDep, principal: PrincipalDep
) -> FederatedRunPublic:
    """Complete the run with its candidate version (and rollout), or fail it with the builder's error."""
    row = runs.report_candidate(
        session=session, run_id=run_id, report=body, data_dir=coordinator.settings.data_dir, actor=principal.name
    )
    return runs.run_public(row)
