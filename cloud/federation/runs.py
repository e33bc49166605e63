"""Federated runs in the database: create one (validated, its cohort chosen), list, show, stop, and the
transitions the runner and the candidate builder make.

A run moves `pending → running → building → completed`, or ends `failed` / `stopped`. Every transition is a
conditional update (`WHERE status = <the status it leaves>`), so the runner thread and a request acting on the
same run at once never both win: the loser sees that the run moved and acts on what it became.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import update
from sqlmodel import Session, col, select

from cloud import audit
from cloud.errors import ConflictError, InvalidInputError, NotFoundError, TransientError
from cloud.federation.cohort import CohortDevice, select_cohort, shortfall
from cloud.federation.flower import FlowerError
from cloud.federation.params import MAX_PROGRAM_BYTES, CandidateReport, FederatedRunCreate, check_params
from cloud.models import Device, FederatedRun, FederatedRunPublic, RunStatus, in_fleet
from cloud.services.aliases import resolve_version
from cloud.services.registry import get_model_version
from protocol.messages import utcnow

__all__ = [
    "NOT_ENABLED",
    "RUNNER_ACTOR",
    "FlowerStopper",
    "NodeLookup",
    "app_dir",
    "create_run",
    "finish",
    "get_run",
    "list_runs",
    "live_runs",
    "read_progress",
    "read_summary",
    "report_candidate",
    "result_dir",
    "run_dir",
    "run_public",
    "stop_run",
    "transition",
]

log = logging.getLogger(__name__)

NOT_ENABLED = "federated learning is not enabled on this coordinator (start it with `edgefleet up --federated`)"
RUNNER_ACTOR = "federated-runner"
_LIVE = (RunStatus.PENDING.value, RunStatus.RUNNING.value)  # runs whose devices train (or are about to)

NodeLookup = Callable[[Session, list[str]], Mapping[str, str]]


class FlowerStopper(Protocol):
    """The part of `FlowerControl` a stop request needs."""

    def stop_run(self, run_id: int) -> None: ...


# -- where a run keeps its files -------------------------------------------------------------------


def run_dir(data_dir: Path, run_id: int) -> Path:
    """`<data_dir>/federated/runs/<id>`: the Flower App, its result and the candidate builder's log."""
    return data_dir / "federated" / "runs" / str(run_id)


def app_dir(data_dir: Path, run_id: int) -> Path:
    """The run's copy of the Flower App template, with its trainable.json."""
    return run_dir(data_dir, run_id) / "app"


def result_dir(data_dir: Path, run_id: int) -> Path:
    """Where the ServerApp writes progress.jsonl, final.npz and summary.json."""
    return run_dir(data_dir, run_id) / "result"


def read_progress(directory: Path) -> list[dict[str, Any]]:
    """The lines of `directory/progress.jsonl` so far (a line still being written, or a bad one, is skipped)."""
    try:
        text = (directory / "progress.jsonl").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    rounds = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            rounds.append(entry)
    return rounds


def read_summary(directory: Path) -> dict[str, Any] | None:
    """`directory/summary.json` (written atomically at the end of a run); None while absent or unreadable."""
    try:
        summary = json.loads((directory / "summary.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


# -- create ----------------------------------------------------------------------------------------


def _parent(session: Session, model: str) -> tuple[str, str, str | None]:
    """`digits:1.0` or `digits@production` → (name, version, alias named or None)."""
    if "@" in model:
        return resolve_version(session=session, model=model, version=None)
    name, _, version = model.partition(":")
    return name, version, None


def _cohort_devices(session: Session, selector: Mapping[str, str]) -> list[CohortDevice]:
    rows = session.exec(select(Device).where(in_fleet()))
    return [
        CohortDevice(
            id=d.id,
            tags=dict(d.tags or {}),
            enrolment=d.enrolment,
            status=d.status,
            model_name=d.active_model_name,
            model_version=d.active_model_version,
            desired_generation=d.desired_generation,
            reported_generation=d.reported_generation,
            update_phase=d.update_phase,
        )
        for d in rows
        if all((d.tags or {}).get(k) == v for k, v in selector.items())
    ]


def live_runs(session: Session) -> list[FederatedRun]:
    """Runs whose devices train now or are about to (pending, running)."""
    return list(session.exec(select(FederatedRun).where(col(FederatedRun.status).in_(_LIVE))))


def create_run(
    *,
    session: Session,
    body: FederatedRunCreate,
    flower_enabled: bool,
    data_dir: Path,
    nodes: NodeLookup,
    actor: str,
) -> FederatedRun:
    """A pending run of `body.model` on its cohort, audited as `actor`; the runner starts it.

    409 when federated learning is off, the version has no (or too big a) trainable form, or fewer than
    `min_nodes` devices are eligible (the message counts why each other one is not); 404 for an unknown version.
    """
    params = check_params(body)
    if not flower_enabled:
        raise ConflictError(NOT_ENABLED)
    name, version, alias = _parent(session, body.model)
    record = get_model_version(session=session, name=name, version=version)
    trainable = record.trainable
    if not trainable:
        raise ConflictError(
            f"version {name}:{version} has no trainable form: push one with `edgefleet models push --trainable`"
        )
    if int(trainable.get("size", 0)) > MAX_PROGRAM_BYTES:
        raise ConflictError(
            f"the trainable form of {name}:{version} is {int(trainable['size']) / 1e6:.1f} MB; a Flower App carries "
            f"at most {MAX_PROGRAM_BYTES / 1e6:.1f} MB, so it cannot be trained federatedly"
        )
    if body.eval_data is not None and not (Path(body.eval_data).is_absolute() and Path(body.eval_data).is_file()):
        raise InvalidInputError(
            f"eval_data {body.eval_data!r} is not a file on the coordinator host (give an absolute path)",
            field="eval_data",
        )
    devices = _cohort_devices(session, body.selector)
    busy = {device: run.id or 0 for run in live_runs(session) for device in run.devices}
    cohort = select_cohort(
        devices,
        selector=body.selector,
        model=name,
        version=version,
        nodes=nodes(session, [d.id for d in devices]),
        busy=busy,
    )
    reason = shortfall(cohort, selector=body.selector, min_nodes=body.min_nodes)
    if reason is not None:
        raise ConflictError(f"cannot start a federated run of {name}:{version}: {reason}")
    row = FederatedRun(
        model_name=name,
        parent_version=version,
        selector=dict(body.selector),
        params=params | ({"alias": alias} if alias else {}),
        devices=list(cohort.eligible),
        node_ids=list(cohort.eligible.values()),
        created_by=actor,
    )
    session.add(row)
    session.flush()
    assert row.id is not None
    row.params = row.params | {"result_dir": str(result_dir(data_dir, row.id).resolve())}
    details = {"model": f"{name}:{version}", "devices": row.devices, "rounds": body.rounds, "strategy": body.strategy}
    audit.record(session=session, actor=actor, action="federated_run.created", subject=str(row.id), details=details)
    session.commit()
    session.refresh(row)
    log.info("federated run created id=%s model=%s:%s devices=%d", row.id, name, version, len(row.devices))
    return row


# -- read ------------------------------------------------------------------------------------------


def get_run(*, session: Session, run_id: int) -> FederatedRun:
    """One run; `NotFoundError` if there is none with that id."""
    row = session.get(FederatedRun, run_id)
    if row is None:
        raise NotFoundError(f"federated run {run_id} does not exist")
    return row


def list_runs(
    *, session: Session, model: str | None = None, status: str | None = None, limit: int = 100
) -> list[FederatedRun]:
    """Runs, newest first, of one model and/or in one status when given."""
    statement = select(FederatedRun)
    if model is not None:
        statement = statement.where(FederatedRun.model_name == model)
    if status is not None:
        statement = statement.where(FederatedRun.status == status)
    return list(session.exec(statement.order_by(col(FederatedRun.id).desc()).limit(limit)))


def run_public(row: FederatedRun) -> FederatedRunPublic:
    """The API shape of a run."""
    return FederatedRunPublic.model_validate(row)


# -- transitions -----------------------------------------------------------------------------------


def transition(session: Session, run_id: int, leaving: RunStatus, **values: Any) -> bool:
    """Set `values` on run `run_id` if it is still `leaving` (not committed); False when it moved meanwhile."""
    values.setdefault("updated_at", utcnow())
    if RunStatus(values.get("status", leaving)).finished:
        values.setdefault("finished_at", values["updated_at"])
    statement = (
        update(FederatedRun)
        .where(col(FederatedRun.id) == run_id, col(FederatedRun.status) == leaving.value)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    changed = session.connection().execute(statement).rowcount == 1
    if changed:
        session.expire_all()
    return changed


def finish(
    session: Session,
    run_id: int,
    leaving: RunStatus,
    status: RunStatus,
    *,
    actor: str = RUNNER_ACTOR,
    error: str | None = None,
    **values: Any,
) -> bool:
    """End run `run_id` (if still `leaving`) as `status` with `error`, audited and committed; False if it moved."""
    assert status.finished
    if not transition(session, run_id, leaving, status=status.value, error=error, **values):
        session.rollback()
        return False
    details = {"status": status.value, "error": error} | {
        k: v for k, v in values.items() if k in ("candidate_version", "rollout_id", "flower_run_id")
    }
    action = "federated_run.stopped" if status is RunStatus.STOPPED else "federated_run.finished"
    audit.record(session=session, actor=actor, action=action, subject=str(run_id), details=details)
    session.commit()
    log.info("federated run %s %s%s", run_id, status.value, f": {error}" if error else "")
    return True


def stop_run(*, session: Session, run_id: int, flower: FlowerStopper | None, actor: str) -> FederatedRun:
    """Stop a run that has not finished: cancel it before it starts, stop its Flower run, or drop its building.

    409 for a finished run; 503 when Flower does not take the stop (the run keeps going; try again).
    """
    for _ in range(3):  # the runner may move the run between our read and our write: act on what it became
        row = get_run(session=session, run_id=run_id)
        status = RunStatus(row.status)
        if status.finished:
            raise ConflictError(f"federated run {run_id} is {status.value} already")
        if status is RunStatus.RUNNING and row.flower_run_id is not None and flower is not None:
            try:
                flower.stop_run(int(row.flower_run_id))
            except FlowerError as exc:
                raise TransientError(f"could not stop Flower run {row.flower_run_id} of run {run_id}: {exc}") from exc
        if finish(session, run_id, status, RunStatus.STOPPED, actor=actor, error=f"stopped by {actor}"):
            return get_run(session=session, run_id=run_id)
    raise TransientError(f"federated run {run_id} kept changing while it was being stopped; try again")


def report_candidate(
    *, session: Session, run_id: int, report: CandidateReport, data_dir: Path, actor: str
) -> FederatedRun:
    """Record the candidate builder's outcome: the run is completed (with its candidate) or failed (with why).

    409 unless the run is building; 422 when the report names neither a version nor an error, or a version that
    is not registered.
    """
    row = get_run(session=session, run_id=run_id)
    if row.status != RunStatus.BUILDING.value:
        raise ConflictError(f"federated run {run_id} is {row.status}, not building: no candidate report is expected")
    summary = read_summary(result_dir(data_dir, run_id)) or row.summary
    if report.error is not None:
        done = finish(
            session,
            run_id,
            RunStatus.BUILDING,
            RunStatus.FAILED,
            actor=actor,
            error=f"candidate not built: {report.error}",
            summary=summary,
            candidate_version=report.candidate_version,
            rollout_id=report.rollout_id,
        )
    else:
        if report.candidate_version is None:
            raise InvalidInputError("report the candidate_version pushed, or an error", field="candidate_version")
        try:
            get_model_version(session=session, name=row.model_name, version=report.candidate_version)
        except NotFoundError as exc:
            raise InvalidInputError(f"candidate_version: {exc}", field="candidate_version") from exc
        done = finish(
            session,
            run_id,
            RunStatus.BUILDING,
            RunStatus.COMPLETED,
            actor=actor,
            summary=summary,
            candidate_version=report.candidate_version,
            rollout_id=report.rollout_id,
        )
    if not done:
        raise ConflictError(f"federated run {run_id} changed while its candidate was reported; it is not building")
    return get_run(session=session, run_id=run_id)
