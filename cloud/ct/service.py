"""Continuous training (docs/drift.md): a model's policy turns a drift alert on a cohort into a federated run on
that cohort, whose candidate is built, signed and canaried against the parent by the federated machinery, and
promoted or rolled back by the rollout's gates.

`step` is what the coordinator's CT thread runs every tick: it starts a turn (`CtAction`) for each open alert a
policy covers — waiting for a person when the policy says so — and follows every unfinished turn through its
federated run and rollout. With `wait_for` `promote` the candidate's canary holds after its first wave passed its
gates (`hold_after_waves`) and the turn waits in `awaiting_promotion`: approving promotes the rollout's next wave,
rejecting aborts it and rolls the canary back to the parent. Each change is audited (`ct.*`). One unfinished turn
per policy and cohort; after a turn ends, the cohort's next one waits `cooldown_s`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlmodel import Session, col, select

from cloud import audit
from cloud.coordinator import Coordinator
from cloud.errors import CloudError, ConflictError, InvalidInputError, NotFoundError
from cloud.federation import runs
from cloud.federation.nodes import eligible_node_ids
from cloud.federation.params import FederatedRunCreate
from cloud.models import (
    Alert,
    CtAction,
    CtActionStatus,
    CtPolicy,
    CtPolicyBase,
    CtStep,
    CtTrigger,
    FederatedRun,
    Rollout,
    RunStatus,
    as_utc,
)
from cloud.rollouts import service as rollouts
from cloud.rollouts.inputs import Abort, Promote
from cloud.rollouts.plan import HELD_FOR_PROMOTION
from cloud.rollouts.state import RolloutStatus
from protocol.messages import utcnow

__all__ = [
    "CtContext",
    "approve_action",
    "delete_policy",
    "get_action",
    "get_policy",
    "list_actions",
    "list_policies",
    "reject_action",
    "set_policy",
    "step",
]

log = logging.getLogger(__name__)

ACTOR = "coordinator"
_WAITING = {
    CtStep.RETRAIN.value: CtActionStatus.AWAITING_RETRAIN,
    CtStep.PROMOTE.value: CtActionStatus.AWAITING_PROMOTION,
}
_CANARY_WAVE = 1  # the canary plan's first wave: the candidate on a few devices of the cohort
_ROLLED_BACK = {RolloutStatus.ROLLED_BACK.value, RolloutStatus.ABORTED.value}
_ROLLING = (CtActionStatus.ROLLING_OUT.value, CtActionStatus.AWAITING_PROMOTION.value)
_MOVING = (RolloutStatus.RUNNING.value, RolloutStatus.BAKING.value, RolloutStatus.ROLLING_BACK.value)


@dataclass(frozen=True)
class CtContext:
    """What starting a federated run needs from the coordinator."""

    flower_enabled: bool
    data_dir: Path
    nodes: Callable[..., object]

    @classmethod
    def of(cls, coordinator: Coordinator) -> CtContext:
        """The running coordinator's: its Flower control (if federated), data directory and SuperNode lookup."""
        return cls(coordinator.flower is not None, coordinator.settings.data_dir, eligible_node_ids)


# -- policies ------------------------------------------------------------------------------------------


def _check_policy(body: CtPolicyBase) -> None:
    if body.trigger not in {t.value for t in CtTrigger}:
        raise InvalidInputError(f"trigger {body.trigger!r}: one of {[t.value for t in CtTrigger]}", field="trigger")
    if body.rollout not in {"canary", "none"}:
        raise InvalidInputError(f"rollout {body.rollout!r}: canary or none", field="rollout")
    if body.strategy not in {"fedavg", "fedprox"}:
        raise InvalidInputError(f"strategy {body.strategy!r}: fedavg or fedprox", field="strategy")
    if body.retrain != "federated":
        raise InvalidInputError(f"retrain {body.retrain!r}: federated is the one way to retrain", field="retrain")
    for step_name in _steps(body.wait_for):
        if step_name not in _WAITING:
            raise InvalidInputError(
                f"wait_for {step_name!r}: a person can approve {sorted(_WAITING)} (with rollout=none the candidate "
                "waits for a person's rollout anyway)",
                field="wait_for",
            )
    if CtStep.PROMOTE.value in _steps(body.wait_for) and body.rollout != "canary":
        raise InvalidInputError(
            "wait_for promote needs rollout canary: there is no canary to promote", field="wait_for"
        )


def _steps(wait_for: str) -> list[str]:
    return [s.strip() for s in wait_for.split(",") if s.strip()]


def set_policy(*, session: Session, body: CtPolicyBase, actor: str) -> CtPolicy:
    """Create or replace the policy of `body.model_name` (audited as `ct.policy_set`)."""
    _check_policy(body)
    row = session.exec(select(CtPolicy).where(CtPolicy.model_name == body.model_name)).first()
    if row is None:
        row = CtPolicy(**body.model_dump(), created_by=actor)
    else:
        for key, value in body.model_dump().items():
            setattr(row, key, value)
        row.updated_at = utcnow()
    session.add(row)
    audit.record(
        session=session, actor=actor, action="ct.policy_set", subject=body.model_name, details=body.model_dump()
    )
    session.commit()
    session.refresh(row)
    return row


def list_policies(*, session: Session) -> list[CtPolicy]:
    """Every policy, by model name."""
    return list(session.exec(select(CtPolicy).order_by(col(CtPolicy.model_name))))


def get_policy(*, session: Session, model: str) -> CtPolicy:
    """The policy of `model`; `NotFoundError` when it has none."""
    row = session.exec(select(CtPolicy).where(CtPolicy.model_name == model)).first()
    if row is None:
        raise NotFoundError(f"model {model} has no continuous-training policy (`edgefleet ct set {model} ...`)")
    return row


def delete_policy(*, session: Session, model: str, actor: str) -> None:
    """Remove the policy of `model` (its turns stay in the history; unfinished ones are followed no more)."""
    row = get_policy(session=session, model=model)
    for action in session.exec(select(CtAction).where(CtAction.policy_id == row.id)):
        if not CtActionStatus(action.status).finished:
            raise ConflictError(
                f"turn {action.id} of {model}'s policy is {action.status}: let it end or reject it first"
            )
    for action in session.exec(select(CtAction).where(CtAction.policy_id == row.id)):
        session.delete(action)
    session.delete(row)
    audit.record(session=session, actor=actor, action="ct.policy_deleted", subject=model)
    session.commit()


# -- turns -----------------------------------------------------------------------------------------------


def list_actions(*, session: Session, model: str | None = None, limit: int = 100) -> list[CtAction]:
    """Turns of the loop, newest first."""
    statement = select(CtAction).order_by(col(CtAction.id).desc()).limit(limit)
    if model is not None:
        statement = statement.where(CtAction.model_name == model)
    return list(session.exec(statement))


def get_action(*, session: Session, action_id: int) -> CtAction:
    """One turn; `NotFoundError` when unknown."""
    row = session.get(CtAction, action_id)
    if row is None:
        raise NotFoundError(f"continuous-training turn {action_id} not found")
    return row


def _set_status(session: Session, action: CtAction, status: CtActionStatus, detail: str, actor: str = ACTOR) -> None:
    action.status = status.value
    action.detail = detail[:2000]
    action.updated_at = utcnow()
    if status.finished:
        action.finished_at = action.updated_at
    session.add(action)
    details = {"status": status.value, "detail": action.detail, "run": action.federated_run_id,
               "candidate": action.candidate_version, "rollout": action.rollout_id}  # fmt: skip
    audit.record(session=session, actor=actor, action=f"ct.{status.value}", subject=_subject(action), details=details)


def _subject(action: CtAction) -> str:
    return f"{action.model_name}:{action.version} {action.cohort} (turn {action.id})"


def _start_run(session: Session, policy: CtPolicy, action: CtAction, context: CtContext, actor: str) -> None:
    """Start the federated run of a turn (TRAINING), or fail the turn with the reason the run could not start."""
    tag, _, value = action.cohort.partition("=")
    body = FederatedRunCreate(
        model=f"{action.model_name}:{action.version}",
        selector={tag: value},
        rounds=policy.rounds,
        strategy="fedprox" if policy.strategy == "fedprox" else "fedavg",
        min_nodes=policy.min_nodes,
        local_epochs=policy.local_epochs,
        lr=policy.lr,
        rollout="canary" if policy.rollout == "canary" else None,
        rollout_plan=_canary_plan(policy),
        **({"max_accuracy_drop": policy.max_accuracy_drop} if policy.max_accuracy_drop is not None else {}),
    )
    session.commit()  # the turn is stored whatever becomes of the run (create_run commits or raises)
    try:
        run = runs.create_run(
            session=session, body=body, flower_enabled=context.flower_enabled, data_dir=context.data_dir,
            nodes=context.nodes, actor=f"ct:{actor}",  # type: ignore[arg-type]
        )  # fmt: skip
    except CloudError as exc:  # too few nodes, no trainable form, federated learning off: the turn says why
        session.rollback()
        _set_status(session, action, CtActionStatus.FAILED, f"the federated run could not start: {exc}", actor)
        return
    action.federated_run_id = run.id
    _set_status(session, action, CtActionStatus.TRAINING, f"federated run {run.id} on {action.cohort}", actor)


def _canary_plan(policy: CtPolicy) -> dict[str, object] | None:
    """The canary plan's overrides of the run: the policy's, held after the canary wave when a person promotes."""
    if policy.rollout != "canary":
        return None
    if CtStep.PROMOTE.value not in _steps(policy.wait_for):
        return policy.rollout_plan
    return {**(policy.rollout_plan or {}), "hold_after_waves": [_CANARY_WAVE]}


def _held(rollout: Rollout) -> bool:
    """The rollout paused by its plan's hold, not by a failed gate or a person."""
    reason = (rollout.state or {}).get("reason") or ""
    return rollout.status == RolloutStatus.PAUSED.value and HELD_FOR_PROMOTION in str(reason)


def _rollout_of(session: Session, action: CtAction) -> Rollout:
    rollout = session.get(Rollout, action.rollout_id) if action.rollout_id is not None else None
    if rollout is None:
        raise ConflictError(f"turn {action.id}'s rollout is gone")
    return rollout


def approve_action(*, session: Session, action_id: int, actor: str, context: CtContext) -> CtAction:
    """A person approves the step a turn waits for: the federated run, or the promotion of the held canary."""
    action = get_action(session=session, action_id=action_id)
    if action.status == CtActionStatus.AWAITING_PROMOTION.value:
        rollout = _rollout_of(session, action)
        command = Promote(command_id=rollouts.new_command_id(), by=actor)
        rollouts.queue_command(session=session, rollout_id=rollout.id or 0, command=command, actor=actor)
        action.approved_by = actor
        _set_status(session, action, CtActionStatus.ROLLING_OUT, f"promotion of {action.candidate_version} on "
                    f"{action.cohort} approved by {actor}: rollout {rollout.id} goes on", actor)  # fmt: skip
        session.commit()
        session.refresh(action)
        return action
    if action.status != CtActionStatus.AWAITING_RETRAIN.value:
        raise ConflictError(f"turn {action_id} is {action.status}: nothing waits for an approval")
    policy = session.get(CtPolicy, action.policy_id)
    if policy is None:
        raise ConflictError(f"turn {action_id}'s policy is gone")
    action.approved_by = actor
    _start_run(session, policy, action, context, actor)
    session.commit()
    session.refresh(action)
    return action


def reject_action(*, session: Session, action_id: int, actor: str, reason: str = "") -> CtAction:
    """A person declines the step a turn waits for; the turn ends (the alert stays until the cohort recovers)."""
    action = get_action(session=session, action_id=action_id)
    waiting = (CtActionStatus.AWAITING_RETRAIN.value, CtActionStatus.AWAITING_PROMOTION.value)
    if action.status not in waiting:
        raise ConflictError(f"turn {action_id} is {action.status}: only a waiting step can be rejected")
    why = reason or f"rejected by {actor}"
    if action.status == CtActionStatus.AWAITING_PROMOTION.value:  # the canary goes back to the parent
        rollout = _rollout_of(session, action)
        command = Abort(command_id=rollouts.new_command_id(), by=actor, rollback=True, reason=f"ct: {why}")
        rollouts.queue_command(session=session, rollout_id=rollout.id or 0, command=command, actor=actor)
        why = f"{why} (rollout {rollout.id} aborted, its canary rolled back to {action.version})"
    _set_status(session, action, CtActionStatus.REJECTED, why, actor)
    session.commit()
    session.refresh(action)
    return action


def _alert_model(alert: Alert) -> tuple[str, str] | None:
    name, sep, version = (alert.model_name or "").partition(":")
    return (name, version) if sep and name and version else None


def _busy(session: Session, policy: CtPolicy, cohort: str, now: datetime) -> bool:
    """An unfinished turn on the cohort, or one that ended within the cooldown."""
    for action in session.exec(select(CtAction).where(CtAction.policy_id == policy.id, CtAction.cohort == cohort)):
        if not CtActionStatus(action.status).finished:
            return True
        ended = as_utc(action.finished_at)
        if ended is not None and now - ended < timedelta(seconds=policy.cooldown_s):
            return True
    return False


def _start_turns(session: Session, context: CtContext, now: datetime) -> None:
    policies = {p.model_name: p for p in session.exec(select(CtPolicy).where(col(CtPolicy.enabled)))}
    if not policies:
        return
    alerts = session.exec(select(Alert).where(col(Alert.resolved_at).is_(None)).order_by(col(Alert.id)))
    for alert in alerts:
        ref = _alert_model(alert)
        policy = policies.get(ref[0]) if ref else None
        if ref is None or policy is None or alert.rule != policy.trigger:
            continue
        if not alert.cohort.startswith(f"{policy.by}=") or alert.cohort == f"{policy.by}=":
            continue  # the policy's cohorts are values of its tag (devices without it are no cohort to retrain)
        if session.exec(select(CtAction.id).where(CtAction.alert_id == alert.id)).first() is not None:
            continue
        if _busy(session, policy, alert.cohort, now):
            continue
        assert policy.id is not None
        action = CtAction(
            policy_id=policy.id, model_name=ref[0], version=ref[1], cohort=alert.cohort, alert_id=alert.id
        )
        session.add(action)
        session.flush()
        if CtStep.RETRAIN.value in _steps(policy.wait_for):
            status = _WAITING[CtStep.RETRAIN.value]
            _set_status(session, action, status, f"alert {alert.id}: {alert.message}; waits for approval")
        else:
            _start_run(session, policy, action, context, ACTOR)
        session.commit()


def _follow(session: Session, action: CtAction) -> None:
    if action.status == CtActionStatus.TRAINING.value and action.federated_run_id is not None:
        run = session.get(FederatedRun, action.federated_run_id)
        if run is None:
            _set_status(session, action, CtActionStatus.FAILED, "its federated run is gone")
        elif run.status in (RunStatus.FAILED.value, RunStatus.STOPPED.value):
            _set_status(session, action, CtActionStatus.FAILED, f"federated run {run.id} {run.status}: {run.error}")
        elif run.status == RunStatus.COMPLETED.value:
            action.candidate_version, action.rollout_id = run.candidate_version, run.rollout_id
            if run.rollout_id is not None:
                _set_status(session, action, CtActionStatus.ROLLING_OUT, f"canary rollout {run.rollout_id} of "
                            f"{run.candidate_version} on {action.cohort}")  # fmt: skip
            else:
                _set_status(session, action, CtActionStatus.AWAITING_ROLLOUT, f"candidate {run.candidate_version} "
                            "built and signed; a person decides its rollout")  # fmt: skip
    elif action.status in _ROLLING and action.rollout_id is not None:
        rollout = session.get(Rollout, action.rollout_id)
        held = rollout is not None and _held(rollout)
        if rollout is None:
            _set_status(session, action, CtActionStatus.FAILED, "its rollout is gone")
        elif held and action.status != CtActionStatus.AWAITING_PROMOTION.value:
            _set_status(session, action, CtActionStatus.AWAITING_PROMOTION, f"the canary of {action.candidate_version} "
                        f"on {action.cohort} passed its gates (rollout {rollout.id}); `ct approve {action.id}` "
                        f"promotes it, `ct reject {action.id}` rolls it back")  # fmt: skip
        elif not held and action.status == CtActionStatus.AWAITING_PROMOTION.value and rollout.status in _MOVING:
            _set_status(session, action, CtActionStatus.ROLLING_OUT, f"rollout {rollout.id} {rollout.status} again")
        elif rollout.status == RolloutStatus.COMPLETED.value:
            _set_status(
                session, action, CtActionStatus.PROMOTED, f"{action.candidate_version} promoted on {action.cohort}"
            )
        elif rollout.status in _ROLLED_BACK:
            _set_status(session, action, CtActionStatus.ROLLED_BACK, f"rollout {rollout.id} {rollout.status}")


def step(*, session: Session, context: CtContext, now: datetime | None = None) -> None:
    """One tick: start turns for newly alerted cohorts, follow the unfinished ones."""
    now = now or utcnow()
    _start_turns(session, context, now)
    moving = (CtActionStatus.TRAINING.value, *_ROLLING)
    for action in session.exec(select(CtAction).where(col(CtAction.status).in_(moving))).all():
        _follow(session, action)
        session.commit()
