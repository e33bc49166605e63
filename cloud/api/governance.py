"""Routes of governance: the TUF image repository (public metadata, protected targets) and approvers' signatures.

Metadata is public (it is signed; any TUF client verifies it): `GET /api/v1/tuf/metadata/{file}` serves
`{version}.root.json`, `timestamp.json`, `{version}.snapshot.json`, `{version}.targets.json` and the delegated
roles. Target bytes (`/api/v1/tuf/targets/{dir}/{sha256}.{name}`, consistent snapshots) need a viewer token or a
device's download token, like `/api/v1/artifacts`. Approvers fetch what they sign and post their signatures.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, Field
from sqlmodel import Session
from tuf.api.metadata import Metadata, Targets

from cloud.api.artifacts import authorize_download
from cloud.api.deps import CoordinatorDep, PrincipalDep, requires
from cloud.auth import Role
from cloud.errors import ConfigurationError, NotFoundError
from cloud.governance.service import Governance
from protocol.governance import high_role
from protocol.messages import Name, Version

__all__ = ["public_router", "router"]

public_router = APIRouter(tags=["governance"])
router = APIRouter(tags=["governance"])

_APPROVER = requires(Role.APPROVER)


def _governance(coordinator: CoordinatorDep) -> Governance:
    if coordinator.governance is None:
        raise ConfigurationError("governance is not initialized on this coordinator")
    return coordinator.governance


@public_router.get("/tuf/metadata/{filename}", summary="TUF metadata of the image repository (public, signed)")
def tuf_metadata(filename: Annotated[str, Path(max_length=300)], coordinator: CoordinatorDep) -> Response:
    """A metadata file as a TUF client asks for it (`timestamp.json`, `{version}.{role}.json`)."""
    governance = _governance(coordinator)
    with Session(coordinator.engine) as session:
        data = governance.repository.file(session, filename)
    return Response(data, media_type="application/json", headers={"Cache-Control": "no-cache"})


@public_router.get("/tuf/targets/{target:path}", summary="A target's bytes (viewer token or device download token)")
def tuf_target(
    target: Annotated[str, Path(max_length=600)], request: Request, coordinator: CoordinatorDep
) -> FileResponse:
    """`{dir}/{sha256}.{file}`: the artifact with that digest (TUF consistent-snapshot target naming)."""
    directory, _, name = target.rpartition("/")
    digest, dot, _file = name.partition(".")
    if not dot or len(digest) != 64 or not directory:
        raise NotFoundError(f"{target} is not a target path of the form dir/sha256.name")
    authorize_download(request, coordinator, digest)
    return FileResponse(coordinator.store.path(digest), media_type="application/octet-stream")


class PendingApproval(BaseModel):
    """What an approver signs: the role's metadata (with the signatures so far) and a summary of its targets."""

    role: str
    version: int
    expires: datetime
    metadata: dict[str, Any]
    targets: dict[str, dict[str, Any]]
    signatures: int
    threshold: int


class ApprovalSubmit(BaseModel):
    """An approver's signature (hex) over the canonical `signed` part of the pending role."""

    keyid: str = Field(min_length=1, max_length=64)
    signature: str = Field(min_length=1, max_length=1024)


class ApprovalResult(BaseModel):
    """How many valid approvals the version has, how many it needs, and whether it is published now."""

    role: str
    valid: int
    threshold: int
    published: bool


@router.get(
    "/approvals/{name}/{version}/pending", dependencies=[_APPROVER], summary="What approvers sign for a version"
)
def pending_approval(
    name: Annotated[Name, Path()], version: Annotated[Version, Path()], coordinator: CoordinatorDep
) -> PendingApproval:
    """The pending high-risk role of `name:version` (404 when nothing awaits approval)."""
    governance = _governance(coordinator)
    role = high_role(name, version)
    with Session(coordinator.engine) as session:
        row = governance.repository.pending(session, role)
        policy = governance.repository.policy(session)
    md = Metadata[Targets].from_bytes(row.data.encode())
    return PendingApproval(
        role=role,
        version=row.version,
        expires=md.signed.expires,
        metadata=md.to_dict(),
        targets={path: t.to_dict() for path, t in md.signed.targets.items()},
        signatures=sum(1 for k in md.signatures if k in policy.approver_keyids),
        threshold=policy.approval_threshold,
    )


@router.post("/approvals/{name}/{version}", dependencies=[_APPROVER], summary="Approve a high-risk version")
def approve(
    name: Annotated[Name, Path()],
    version: Annotated[Version, Path()],
    body: ApprovalSubmit,
    coordinator: CoordinatorDep,
    principal: PrincipalDep,
) -> ApprovalResult:
    """Add a signature; the version is published (deployable) once the root's threshold of approvers signed."""
    governance = _governance(coordinator)
    valid, published = governance.approve(
        name=name, version=version, keyid=body.keyid, signature=body.signature, actor=principal.name
    )
    with Session(coordinator.engine) as session:
        threshold = governance.repository.policy(session).approval_threshold
    return ApprovalResult(role=high_role(name, version), valid=valid, threshold=threshold, published=published)
