"""Deployments: resolve a target to devices, raise their generation, and hand desired states to a publisher."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

from sqlalchemy import insert, update
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session, col, select

from cloud import audit
from cloud.errors import EmptyTargetError, InvalidInputError, NotFoundError
from cloud.models import (
    Deployment,
    DeploymentPublic,
    DeploymentTarget,
    DeploymentTargetPublic,
    Device,
    ModelVersion,
    TargetStatus,
    in_fleet,
)
from cloud.services.registry import ArtifactLinks, get_model_version
from cloud.variant_policy import NoCompatibleVariantError, Variant, choose_variant, version_variants
from protocol.messages import ArtifactRef, DesiredState, ModelSpec, TensorSpec, utcnow
from protocol.outputs import OutputSemantics

__all__ = [
    "DesiredStatePublisher",
    "assign_devices",
    "create_deployment",
    "deployment_public",
    "deployment_status",
    "desired_state_for",
    "desired_states",
    "get_deployment",
    "list_deployments",
    "next_generation",
    "next_generations",
    "select_devices",
]

log = logging.getLogger(__name__)


class DesiredStatePublisher(Protocol):
    """Whatever delivers desired states to devices (the MQTT bridge; a list in unit tests)."""

    def publish_desired(self, state: DesiredState) -> None:
        """Deliver `state` retained to its device; must not raise for a broker that is down."""
        ...


def select_devices(
    devices: Sequence[Device], *, device_ids: list[str] | None, tags: dict[str, str] | None
) -> list[Device]:
    """The devices a target means: the listed ids, or every device carrying all of `tags`. Pure."""
    if device_ids is not None:
        wanted = set(device_ids)
        return [d for d in devices if d.id in wanted]
    assert tags is not None
    return [d for d in devices if all(d.tags.get(k) == v for k, v in tags.items())]


def deployment_status(statuses: Sequence[str]) -> str:
    """One word for a deployment: in_progress while any target moves, else failed if any failed, else succeeded."""
    if any(s in (TargetStatus.PENDING, TargetStatus.IN_PROGRESS) for s in statuses):
        return "in_progress"
    if any(s == TargetStatus.FAILED for s in statuses):
        return "failed"
    return "succeeded"


def create_deployment(
    *,
    session: Session,
    publisher: DesiredStatePublisher,
    links: ArtifactLinks,
    model: str,
    version: str,
    device_ids: list[str] | None = None,
    tags: dict[str, str] | None = None,
    actor: str = "system",
    alias: str | None = None,
) -> Deployment:
    """Deploy `model:version` to the devices the target selects, and publish their desired states.

    Exactly one of `device_ids` and `tags` is given; `alias` records the alias the request named (already
    resolved to `version`). Decommissioned devices are never selected. Unknown model or version →
    `NotFoundError`; unknown or decommissioned device ids, or a tag selector matching nothing →
    `InvalidInputError`/`EmptyTargetError`.
    """
    if (device_ids is None) == (tags is None):
        raise InvalidInputError("give exactly one of target.device_ids and target.tags", field="target")
    record = get_model_version(session=session, name=model, version=version)
    known = list(session.exec(select(Device).where(in_fleet()).order_by(Device.id)))
    chosen = select_devices(known, device_ids=device_ids, tags=tags)
    if device_ids is not None:
        _refuse_decommissioned(session, device_ids)
        missing = sorted(set(device_ids) - {d.id for d in chosen})
        if missing:
            raise InvalidInputError(
                f"unknown device ids: {', '.join(missing)} (devices enrol when they first connect)",
                field="target.device_ids",
            )
        if not chosen:
            raise EmptyTargetError("target.device_ids is empty", field="target.device_ids")
    elif not chosen:
        selector = ", ".join(f"{k}={v}" for k, v in sorted((tags or {}).items()))
        raise EmptyTargetError(f"no device matches tags {selector or '{}'}", field="target.tags")
    target = {"device_ids": sorted(device_ids)} if device_ids is not None else {"tags": dict(tags or {})}
    deployment = Deployment(
        model_name=model, model_version=version, model_alias=alias, sha256=record.sha256, target=target
    )
    session.add(deployment)
    session.flush()
    assert deployment.id is not None
    states = assign_devices(session=session, deployment=deployment, record=record, devices=chosen, links=links)
    audit.record(
        session=session,
        actor=actor,
        action="deployment.created",
        subject=str(deployment.id),
        details={"model": f"{model}:{version}", "target": target, "devices": [s.device_id for s in states]},
    )
    session.commit()
    session.refresh(deployment)
    # Published after the commit: the stored desired states are the truth the bridge republishes on reconnect.
    for state in states:
        publisher.publish_desired(state)
    log.info("deployment created id=%s model=%s:%s devices=%d", deployment.id, model, version, len(states))
    return deployment


def _refuse_decommissioned(session: Session, device_ids: list[str]) -> None:
    """`InvalidInputError` naming listed devices that were decommissioned (they are out of the fleet)."""
    statement = select(Device.id).where(col(Device.id).in_(device_ids), ~in_fleet())
    retired = sorted(session.exec(statement))
    if retired:
        raise InvalidInputError(
            f"decommissioned devices cannot be deployed to: {', '.join(retired)}", field="target.device_ids"
        )


def desired_state_for(
    *,
    record: ModelVersion,
    device: Device,
    generation: int,
    deployment_id: str | None,
    links: ArtifactLinks,
    variants: Sequence[Variant] | None = None,
) -> DesiredState:
    """The desired state telling `device` to run the model version `record` at `generation`. Pure.

    The one place a desired state is built from a registry record: deployments and rollouts both call it.
    The director signs it when `generation` is known (not for the placeholder generation 0).
    The artifact is the variant `choose_variant` picks from the device's reported capabilities (of `variants`:
    the version's, decoded once for a batch of devices); `NoCompatibleVariantError` when none runs on the device.
    """
    variants = version_variants(record) if variants is None else variants
    choice = choose_variant(variants, record.primary_variant, device.capabilities)
    variant = choice.variant
    spec = ModelSpec(
        name=record.name,
        version=record.version,
        artifact=ArtifactRef(
            url=links.for_device(device.id, variant.sha256),
            sha256=variant.sha256,
            size=variant.size,
            format=variant.format,
        ),
        inputs=variant.inputs,
        outputs=variant.outputs,
        variant=variant.name,
        output_semantics=_semantics_of(record, variant.outputs),
    )
    director = links.instruct(device.id, generation, record, variant) if links.instruct and generation else None
    return DesiredState(
        device_id=device.id, generation=generation, deployment_id=deployment_id, model=spec, director=director
    )


def _semantics_of(record: ModelVersion, outputs: list[TensorSpec]) -> OutputSemantics | None:
    """The version's output semantics when they name this variant's outputs (a converted variant may rename its
    tensors: the device then infers them from the variant itself)."""
    if not record.output_semantics:
        return None
    semantics = OutputSemantics.model_validate(record.output_semantics)
    return semantics if semantics.kind != "unknown" and not semantics.missing_from(outputs) else None


def _signed(
    state: DesiredState, record: ModelVersion, variants: Sequence[Variant], links: ArtifactLinks
) -> DesiredState:
    """`state` with the director's instruction for its generation (unchanged without a director)."""
    if links.instruct is None or state.model is None:
        return state
    variant = next(v for v in variants if v.name == state.model.variant)
    return state.model_copy(update={"director": links.instruct(state.device_id, state.generation, record, variant)})


def assign_devices(
    *, session: Session, deployment: Deployment, record: ModelVersion, devices: Sequence[Device], links: ArtifactLinks
) -> list[DesiredState]:
    """Give each device the next generation for `deployment`: store its desired state and a target row.

    Neither commits nor publishes: the caller commits (with whatever else belongs in the same transaction),
    then publishes the returned states.
    """
    assert deployment.id is not None
    variants = version_variants(record)
    chosen: list[tuple[Device, DesiredState]] = []
    for device in sorted(devices, key=lambda d: d.id):  # one lock order for every writer: no deadlocks
        try:
            # Generation 0 stands in until the device is known to get this state: `next_generations` below.
            state = desired_state_for(
                record=record,
                device=device,
                generation=0,
                deployment_id=str(deployment.id),
                links=links,
                variants=variants,
            )
        except NoCompatibleVariantError as exc:
            # The device keeps its current desired state; the deployment shows why it was left out.
            failed = DeploymentTarget(
                deployment_id=deployment.id,
                device_id=device.id,
                generation=device.desired_generation,
                status=TargetStatus.FAILED.value,
                error_code="no_compatible_variant",
                error_message=str(exc),
            )
            session.add(failed)
            continue
        chosen.append((device, state))
    # One UPDATE ... RETURNING and one supersede for the whole set: a statement per device made a 10,000-device
    # wave cost 20,000 round trips to the database inside the step's transaction.
    generations = next_generations(session, [device for device, _ in chosen])  # locks the rows until the commit
    _supersede_all(session, [device.id for device, _ in chosen])
    states = []
    for device, state in chosen:
        state = _signed(state.model_copy(update={"generation": generations[device.id]}), record, variants, links)
        device.desired_state = state.model_dump(mode="json")
        session.add(device)
        states.append(state)
    # One INSERT for the targets: an ORM object a device cost as much as building its desired state.
    now = utcnow()
    targets = [
        {
            "deployment_id": deployment.id,
            "device_id": state.device_id,
            "generation": state.generation,
            "status": TargetStatus.PENDING.value,
            "updated_at": now,
        }
        for state in states
    ]
    if targets:
        session.execute(insert(DeploymentTarget), targets)
    return states


def next_generation(session: Session, device: Device) -> int:
    """Raise `device`'s desired generation by one in the database, atomically; returns the new generation.

    One `UPDATE ... RETURNING`: concurrent writers (a deployment through the API, a rollout step) each get a
    generation of their own, never the same one twice, and the row stays locked until the caller commits
    (SQLite locks the whole database for the writer), so the last desired state stored has the highest one.
    """
    statement = (
        update(Device)
        .where(col(Device.id) == device.id)
        .values(desired_generation=col(Device.desired_generation) + 1)
        .returning(col(Device.desired_generation))
        .execution_options(synchronize_session=False)
    )
    generation = int(session.exec(statement).scalar_one())
    set_committed_value(device, "desired_generation", generation)  # what the row now holds, without a write
    return generation


def next_generations(session: Session, devices: Sequence[Device]) -> dict[str, int]:
    """`next_generation` for many devices in one statement: device id → its new generation (rows locked likewise)."""
    if not devices:
        return {}
    ids = sorted(device.id for device in devices)
    # Lock the rows in id order first (PostgreSQL): an UPDATE ... IN locks them in scan order, and two writers
    # taking overlapping sets in different orders deadlock. SQLite locks the whole database and ignores this.
    session.exec(select(Device.id).where(col(Device.id).in_(ids)).order_by(col(Device.id)).with_for_update())
    statement = (
        update(Device)
        .where(col(Device.id).in_(ids))
        .values(desired_generation=col(Device.desired_generation) + 1)
        .returning(col(Device.id), col(Device.desired_generation))
        .execution_options(synchronize_session=False)
    )
    generations = {device_id: int(generation) for device_id, generation in session.exec(statement)}
    for device in devices:
        set_committed_value(device, "desired_generation", generations[device.id])
    return generations


def _supersede_all(session: Session, device_ids: list[str]) -> None:
    """Unsettled targets of older generations of these devices will never finish: mark them superseded."""
    if not device_ids:
        return
    session.exec(
        update(DeploymentTarget)
        .where(
            col(DeploymentTarget.device_id).in_(device_ids),
            col(DeploymentTarget.status).in_([TargetStatus.PENDING.value, TargetStatus.IN_PROGRESS.value]),
        )
        .values(status=TargetStatus.SUPERSEDED.value, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def desired_states(*, session: Session) -> list[DesiredState]:
    """Every device's current desired state, as stored (what the bridge republishes on connect)."""
    statement = select(Device).where(col(Device.desired_state).is_not(None)).order_by(Device.id)
    # A JSON `null` (PostgreSQL keeps an ORM None that way) passes the SQL filter but is no desired state.
    return [DesiredState.model_validate(d.desired_state) for d in session.exec(statement) if d.desired_state]


def deployment_public(deployment: Deployment, targets: Sequence[DeploymentTarget]) -> DeploymentPublic:
    """The API shape of a deployment with its targets and a summary status."""
    statuses = [t.status for t in targets]
    return DeploymentPublic.model_validate(
        deployment,
        update={
            "status": deployment_status(statuses),
            "counts": dict(Counter(statuses)),
            "targets": [DeploymentTargetPublic.model_validate(t) for t in targets],
        },
    )


def get_deployment(*, session: Session, deployment_id: int) -> DeploymentPublic:
    """One deployment with per-device progress; `NotFoundError` if unknown."""
    deployment = session.get(Deployment, deployment_id)
    if deployment is None:
        raise NotFoundError(f"deployment {deployment_id} does not exist")
    targets = session.exec(
        select(DeploymentTarget)
        .where(DeploymentTarget.deployment_id == deployment_id)
        .order_by(DeploymentTarget.device_id)
    )
    return deployment_public(deployment, list(targets))


def list_deployments(*, session: Session, limit: int = 100) -> list[DeploymentPublic]:
    """The newest deployments first, with their targets."""
    deployments = list(session.exec(select(Deployment).order_by(col(Deployment.id).desc()).limit(limit)))
    ids = [d.id for d in deployments]
    by_deployment: dict[int, list[DeploymentTarget]] = {}
    if ids:
        statement = select(DeploymentTarget).where(col(DeploymentTarget.deployment_id).in_(ids))
        for target in session.exec(statement.order_by(DeploymentTarget.device_id)):
            by_deployment.setdefault(target.deployment_id, []).append(target)
    return [deployment_public(d, by_deployment.get(d.id or 0, [])) for d in deployments]
