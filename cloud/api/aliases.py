"""Routes of model aliases: list them, set or move one, delete one, and the history of their moves.

Deployments and rollouts name `model@alias` where they would name a version (`cloud.services.aliases`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel

from cloud.api.deps import PrincipalDep, SessionDep, requires
from cloud.auth import Role
from cloud.models import AliasChangePublic, AliasChangesPublic, ModelAliasesPublic, ModelAliasPublic
from cloud.services import aliases
from protocol.messages import Name, Version

__all__ = ["AliasSet", "router"]

_WRITE = requires(Role.PUBLISHER)

router = APIRouter(tags=["registry"])

NamePath = Annotated[Name, Path(description="Model name.")]
AliasPath = Annotated[Name, Path(description="Alias name, e.g. production.")]


class AliasSet(BaseModel):
    """The version an alias is to point at."""

    version: Version


@router.get("/models/{name}/aliases", summary="A model's aliases")
def list_aliases(name: NamePath, session: SessionDep) -> ModelAliasesPublic:
    """Every alias of the model and the version it points at."""
    data = aliases.list_aliases(session=session, name=name)
    return ModelAliasesPublic(data=data, count=len(data))


@router.get("/models/{name}/alias-history", summary="Who moved a model's aliases, when, from which version")
def alias_history(
    name: NamePath,
    session: SessionDep,
    alias: Annotated[Name | None, Query(description="Only this alias.")] = None,
) -> AliasChangesPublic:
    """Every set, move and delete of the model's aliases, oldest first."""
    data = aliases.alias_history(session=session, name=name, alias=alias)
    return AliasChangesPublic(data=data, count=len(data))


@router.put("/models/{name}/aliases/{alias}", dependencies=[_WRITE], summary="Set or move an alias")
def set_alias(
    name: NamePath, alias: AliasPath, body: AliasSet, session: SessionDep, principal: PrincipalDep
) -> ModelAliasPublic:
    """Point `name@alias` at a version of the model (what runs already is not redeployed)."""
    return aliases.set_alias(session=session, name=name, alias=alias, version=body.version, actor=principal.name)


@router.delete("/models/{name}/aliases/{alias}", dependencies=[_WRITE], summary="Delete an alias")
def delete_alias(name: NamePath, alias: AliasPath, session: SessionDep, principal: PrincipalDep) -> AliasChangePublic:
    """Remove `name@alias`; its versions stay. Answers the change as recorded in the alias history."""
    return aliases.delete_alias(session=session, name=name, alias=alias, actor=principal.name)
