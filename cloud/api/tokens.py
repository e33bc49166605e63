"""Routes of API tokens (admin only): create one with a role (its secret is shown once), list, revoke."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import BaseModel

from cloud.api.deps import PrincipalDep, SessionDep, requires
from cloud.auth import Role
from cloud.models import ApiTokenPublic
from cloud.services import tokens
from protocol.messages import Name

__all__ = ["router"]

router = APIRouter(tags=["tokens"], dependencies=[requires(Role.ADMIN)])


class TokenCreate(BaseModel):
    """A token's name (who or what uses it) and its role."""

    name: Name
    role: Role


class TokenCreated(ApiTokenPublic):
    """A new token with its secret (shown once)."""

    token: str


@router.post("/tokens", status_code=201, summary="Create an API token")
def create_token(body: TokenCreate, session: SessionDep, principal: PrincipalDep) -> TokenCreated:
    """A new token with one role; the secret is in this answer only."""
    secret, record = tokens.create_token(session=session, name=body.name, role=body.role, created_by=principal.name)
    return TokenCreated(**ApiTokenPublic.model_validate(record, from_attributes=True).model_dump(), token=secret)


@router.get("/tokens", summary="List API tokens")
def list_tokens(session: SessionDep) -> list[ApiTokenPublic]:
    """Every token (names, roles, last use; never the secrets)."""
    return [ApiTokenPublic.model_validate(r, from_attributes=True) for r in tokens.list_tokens(session=session)]


@router.delete("/tokens/{name}", summary="Revoke an API token")
def revoke_token(name: Annotated[Name, Path()], session: SessionDep, principal: PrincipalDep) -> ApiTokenPublic:
    """Revoke the token at once (its next request is refused)."""
    record = tokens.revoke_token(session=session, name=name, actor=principal.name)
    return ApiTokenPublic.model_validate(record, from_attributes=True)
