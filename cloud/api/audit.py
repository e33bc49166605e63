"""Routes of the audit log: list entries (viewer), verify the chain (viewer), sign its head now (admin)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from cloud import audit
from cloud.api.deps import CoordinatorDep, SessionDep, requires
from cloud.audit.service import head_seq
from cloud.auth import Role
from cloud.errors import ConflictError
from cloud.models import AuditEntryPublic, as_utc

__all__ = ["AuditCheckpointPublic", "AuditEntriesPublic", "router"]

router = APIRouter(tags=["audit"])


class AuditEntriesPublic(BaseModel):
    """A page of the audit log, oldest first, and the chain's current head."""

    data: list[AuditEntryPublic]
    count: int
    head_seq: int


class AuditCheckpointPublic(BaseModel):
    """A signed checkpoint of the chain's head."""

    seq: int
    hash: str
    keyid: str
    signature: str
    at: datetime


@router.get("/audit", summary="Audit log entries")
def list_audit(
    session: SessionDep,
    after_seq: Annotated[int | None, Query(ge=0, description="Entries after this seq; default: the newest.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    actor: Annotated[str | None, Query(max_length=160)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
) -> AuditEntriesPublic:
    """Entries after `after_seq` (oldest first), or the newest `limit`; optionally of one actor or action."""
    rows = audit.list_entries(session=session, after_seq=after_seq, limit=limit, actor=actor, action=action)
    data = [AuditEntryPublic.model_validate(row, from_attributes=True) for row in rows]
    return AuditEntriesPublic(data=data, count=len(data), head_seq=head_seq(session=session))


@router.get("/audit/verify", summary="Verify the audit chain")
def verify_audit(coordinator: CoordinatorDep) -> audit.AuditReport:
    """Every hash and link recomputed, every checkpoint and the head file checked: problems by seq, or OK."""
    return coordinator.audit_checkpointer().verify()


@router.post("/audit/checkpoint", dependencies=[requires(Role.ADMIN)], summary="Sign the audit chain's head now")
def checkpoint_audit(coordinator: CoordinatorDep) -> AuditCheckpointPublic:
    """A checkpoint of the current head (the existing one if nothing was recorded since); 409 for an empty log."""
    row = coordinator.audit_checkpointer().checkpoint()
    if row is None:
        raise ConflictError("the audit log has no entries yet: there is nothing to sign")
    at = as_utc(row.at) or row.at  # SQLite hands timestamps back without their zone
    return AuditCheckpointPublic(seq=row.seq, hash=row.hash, keyid=row.keyid, signature=row.signature, at=at)
