"""Deleting a model version: refused while anything uses it; its artifacts go once no other version shares them.

A version is in use while a device of the fleet runs it, a device's current desired state names it (a
deployment or rollout sent it), a rollout still holds it (one not finished, or the model's newest completed
rollout, which serves late joiners and can still roll back), or an alias points at it. `version_in_use` says
which, in one line (the API's 409). Deployments and the audit log keep naming a deleted version: history stays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlmodel import Session, col, select

from cloud import audit
from cloud.artifacts import ArtifactStore
from cloud.errors import ConflictError
from cloud.models import Device, ModelCard, ModelVersion, Rollout, in_fleet
from cloud.services.aliases import aliases_of_version
from cloud.services.registry import get_model_version

__all__ = ["DeletedVersion", "VersionUse", "delete_model_version", "find_use", "version_in_use"]

# Rollout statuses that hold nothing any more (`cloud.rollouts.state.TERMINAL`).
_TERMINAL = frozenset({"aborted", "rolled_back"})
_SHOWN = 5  # ids named per reason before "+N more"


@dataclass(frozen=True)
class VersionUse:
    """What holds a version: devices running it, devices told to run it, rollouts and aliases."""

    running: list[str] = field(default_factory=list)
    desired: list[str] = field(default_factory=list)
    rollouts: list[tuple[int, str]] = field(default_factory=list)  # (id, status)
    aliases: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DeletedVersion:
    """A deleted version and the artifacts removed with it (digests no other version references)."""

    name: str
    version: str
    removed_artifacts: list[str]
    kept_artifacts: list[str]


def _ids(ids: list[str]) -> str:
    more = len(ids) - _SHOWN
    return ", ".join(ids[:_SHOWN]) + (f" (+{more} more)" if more > 0 else "")


def version_in_use(name: str, version: str, use: VersionUse) -> str | None:
    """Why `name:version` cannot be deleted, as one line naming each holder and what releases it; None if free. Pure."""
    reasons = []
    if use.running:
        reasons.append(f"devices run it ({_ids(use.running)}): deploy another version to them first")
    if use.desired:
        reasons.append(f"it is the desired state of {_ids(use.desired)}: deploy another version to them first")
    for rollout_id, status in use.rollouts:
        release = "let it finish or abort it" if status != "completed" else "it serves late joiners; abort it"
        reasons.append(f"rollout {rollout_id} ({status}) uses it: {release}")
    if use.aliases:
        named = ", ".join(f"{name}@{a}" for a in use.aliases)
        reasons.append(f"alias {named} points to it: move or delete the alias first")
    if not reasons:
        return None
    return f"cannot delete {name}:{version}: " + "; ".join(reasons)


def find_use(*, session: Session, name: str, version: str) -> VersionUse:
    """Everything that holds `name:version` now (see the module docstring)."""
    fleet = select(Device.id, Device.active_model_name, Device.active_model_version, Device.desired_state)
    running, desired = [], []
    for device_id, active_name, active_version, state in session.exec(fleet.where(in_fleet()).order_by(Device.id)):
        if (active_name, active_version) == (name, version):
            running.append(device_id)
        model = (state or {}).get("model") or {}
        if (model.get("name"), model.get("version")) == (name, version):
            desired.append(device_id)
    return VersionUse(
        running=running,
        desired=desired,
        rollouts=_holding_rollouts(session, name, version),
        aliases=aliases_of_version(session=session, name=name, version=version),
    )


def _holding_rollouts(session: Session, name: str, version: str) -> list[tuple[int, str]]:
    """Rollouts of `name` that hold `version` as target or previous version: every one not ended, and the newest
    completed one (it still serves late joiners and may be aborted with a rollback)."""
    rows = list(session.exec(select(Rollout).where(Rollout.model_name == name).order_by(col(Rollout.id).desc())))
    newest = rows[0].id if rows else None
    held = []
    for row in rows:
        if row.status in _TERMINAL or (row.status == "completed" and row.id != newest):
            continue
        if version in (row.model_version, (row.plan or {}).get("previous_version")):
            assert row.id is not None
            held.append((row.id, row.status))
    return sorted(held)


def delete_model_version(
    *, session: Session, store: ArtifactStore, name: str, version: str, actor: str
) -> DeletedVersion:
    """Delete `name:version` and its card, then the artifacts no other version references; audited as `actor`.

    `NotFoundError` for an unknown version, `ConflictError` (409) with the reason while anything uses it.
    """
    record = get_model_version(session=session, name=name, version=version)
    reason = version_in_use(name, version, find_use(session=session, name=name, version=version))
    if reason is not None:
        raise ConflictError(reason)
    digests = sorted(_digests(record))
    shared = _referenced_elsewhere(session, record)
    removed = [d for d in digests if d not in shared]
    for card in session.exec(select(ModelCard).where(ModelCard.model_version_id == record.id)):
        session.delete(card)
    session.delete(record)
    details = {"sha256": record.sha256, "removed_artifacts": removed, "signing_state": record.signing_state}
    audit.record(session=session, actor=actor, action="model.deleted", subject=f"{name}:{version}", details=details)
    session.commit()
    for digest in removed:  # after the commit: a failed delete leaves every artifact its version needs
        store.delete(digest)
    return DeletedVersion(name, version, removed, [d for d in digests if d in shared])


def _referenced_elsewhere(session: Session, record: ModelVersion) -> set[str]:
    """Digests of every other version's artifacts (primaries and variants)."""
    referenced: set[str] = set()
    for other in session.exec(select(ModelVersion).where(col(ModelVersion.id) != record.id)):
        referenced.update(_digests(other))
    return referenced


def _digests(record: ModelVersion) -> set[str]:
    """The digests of a version's artifacts: its primary, every variant and its trainable form."""
    found = {record.sha256, *(str(v["sha256"]) for v in record.variants if v.get("sha256"))}
    if record.trainable and record.trainable.get("sha256"):
        found.add(str(record.trainable["sha256"]))
    return found
