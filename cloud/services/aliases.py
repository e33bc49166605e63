"""Aliases: movable names of a model's versions (`digits@production`), their history, and resolving them.

A deployment or rollout that names `model@alias` is resolved once, when it is created: it records the concrete
version, so moving the alias later changes nothing that runs. Every set, move and delete is kept as an
`AliasChange` (who, when, from which version to which) and appended to the audit log.
"""

from __future__ import annotations

import re

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from cloud import audit
from cloud.errors import ConflictError, InvalidInputError, NotFoundError
from cloud.models import (
    AliasChange,
    AliasChangePublic,
    Model,
    ModelAlias,
    ModelAliasPublic,
)
from cloud.services.registry import get_model_version
from protocol.messages import utcnow

__all__ = [
    "ALIAS_SEPARATOR",
    "MODEL_REF_PATTERN",
    "alias_history",
    "alias_public",
    "aliases_of_version",
    "delete_alias",
    "list_aliases",
    "resolve_version",
    "set_alias",
    "split_ref",
]

ALIAS_SEPARATOR = "@"
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
# What a deployment or rollout may name as its model: `digits`, or `digits@production` (then without a version).
MODEL_REF_PATTERN = rf"^{_NAME}(@{_NAME})?$"
_REF = re.compile(MODEL_REF_PATTERN)


def split_ref(model: str) -> tuple[str, str | None]:
    """`digits@production` → (`digits`, `production`); `digits` → (`digits`, None). Pure."""
    if not _REF.match(model):
        raise InvalidInputError(f"model {model!r} is neither a model name nor model@alias", field="model")
    name, _, alias = model.partition(ALIAS_SEPARATOR)
    return name, alias or None


def resolve_version(*, session: Session, model: str, version: str | None) -> tuple[str, str, str | None]:
    """The concrete `(name, version, alias)` a deployment or rollout names: `digits` with a version, or
    `digits@production` without one (resolved through the alias now). `alias` is None when none was named.

    `InvalidInputError` for both or neither of an alias and a version; `NotFoundError` for an unknown alias.
    """
    name, alias = split_ref(model)
    if alias is None:
        if not version:
            raise InvalidInputError(f"give a version of {name} (or name an alias: {name}@production)", field="version")
        return name, version, None
    if version:
        raise InvalidInputError(
            f"{model} names its version through the alias; leave out version {version!r}", field="version"
        )
    return name, _require(session, name, alias).version, alias


def _find(session: Session, name: str, alias: str) -> ModelAlias | None:
    return session.exec(select(ModelAlias).where(ModelAlias.model_name == name, ModelAlias.alias == alias)).first()


def _require(session: Session, name: str, alias: str) -> ModelAlias:
    """The alias; `NotFoundError` names the missing model or alias."""
    row = _find(session, name, alias)
    if row is None:
        _require_model(session, name)
        raise NotFoundError(f"model {name!r} has no alias {alias!r} (`edgefleet models alias list {name}`)")
    return row


def set_alias(*, session: Session, name: str, alias: str, version: str, actor: str) -> ModelAliasPublic:
    """Point `name@alias` at `version` (creating the alias or moving it), recorded and audited as `actor`."""
    get_model_version(session=session, name=name, version=version)  # NotFoundError names what is missing
    row = _find(session, name, alias)
    previous = row.version if row is not None else None
    if previous == version:
        assert row is not None
        return alias_public(row)  # nothing moves, nothing to record
    row = row or ModelAlias(model_name=name, alias=alias, version=version)
    row.version, row.updated_by, row.updated_at = version, actor, utcnow()
    session.add(row)
    _record(session, name, alias, previous, version, actor)
    try:
        session.commit()
    except IntegrityError as exc:  # a concurrent first set of the same alias won the race
        session.rollback()
        raise ConflictError(f"alias {name}@{alias} was set concurrently; try again") from exc
    session.refresh(row)
    return alias_public(row)


def delete_alias(*, session: Session, name: str, alias: str, actor: str) -> AliasChangePublic:
    """Remove `name@alias` (the versions stay); `NotFoundError` if it does not exist. Returns the change."""
    row = _require(session, name, alias)
    change = _record(session, name, alias, row.version, None, actor)
    session.delete(row)
    session.commit()
    return _change_public(change)


def _record(
    session: Session, name: str, alias: str, from_version: str | None, to_version: str | None, actor: str
) -> AliasChange:
    change = AliasChange(
        model_name=name, alias=alias, from_version=from_version, to_version=to_version, changed_by=actor
    )
    session.add(change)
    action = "alias.deleted" if to_version is None else "alias.set"
    details = {"from_version": from_version, "to_version": to_version}
    audit.record(session=session, actor=actor, action=action, subject=f"{name}@{alias}", details=details)
    return change


def list_aliases(*, session: Session, name: str) -> list[ModelAliasPublic]:
    """The aliases of model `name`, by alias; `NotFoundError` for an unknown model."""
    _require_model(session, name)
    rows = session.exec(select(ModelAlias).where(ModelAlias.model_name == name).order_by(ModelAlias.alias))
    return [alias_public(row) for row in rows]


def alias_history(*, session: Session, name: str, alias: str | None = None) -> list[AliasChangePublic]:
    """Every change of the aliases of `name` (or of one alias), oldest first."""
    _require_model(session, name)
    statement = select(AliasChange).where(AliasChange.model_name == name)
    if alias is not None:
        statement = statement.where(AliasChange.alias == alias)
    return [_change_public(c) for c in session.exec(statement.order_by(col(AliasChange.id)))]


def aliases_of_version(*, session: Session, name: str, version: str) -> list[str]:
    """The aliases of `name` that point at `version`, sorted."""
    statement = select(ModelAlias.alias).where(ModelAlias.model_name == name, ModelAlias.version == version)
    return sorted(session.exec(statement))


def _require_model(session: Session, name: str) -> None:
    if session.exec(select(Model.id).where(Model.name == name)).first() is None:
        raise NotFoundError(f"model {name!r} does not exist")


def alias_public(row: ModelAlias) -> ModelAliasPublic:
    """The API shape of an alias."""
    return ModelAliasPublic(
        model=row.model_name, alias=row.alias, version=row.version, updated_by=row.updated_by, updated_at=row.updated_at
    )


def _change_public(change: AliasChange) -> AliasChangePublic:
    return AliasChangePublic(
        model=change.model_name,
        alias=change.alias,
        from_version=change.from_version,
        to_version=change.to_version,
        changed_by=change.changed_by,
        changed_at=change.changed_at,
    )
