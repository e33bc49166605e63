"""The artifact route: model bytes by digest, for readers with a token and for devices with a download token.

Devices hold no API token: the desired state they receive carries a URL with `device` and `token` query
parameters (an HMAC of device id and digest, `cloud.auth.artifact_token`), valid only while the device is
enrolled. People and programs use a viewer (or higher) bearer token.

With `artifact_base_url` set, the route checks the caller exactly as before and answers 307 to
`<base>/<sha256>`: object storage or a CDN serves the bytes, and devices verify the digest (and TUF targets
under governance), so the cache cannot substitute them.
"""

from __future__ import annotations

import os
from email.utils import formatdate
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from sqlmodel import Session

from cloud.api.deps import CoordinatorDep, get_principal
from cloud.auth import artifact_token, token_matches
from cloud.errors import UnauthorizedError
from cloud.services.enrolment import check_enrolled
from protocol.messages import DeviceId

__all__ = ["router"]

router = APIRouter(tags=["models"])

# Whole small artifacts are answered from memory (a Range request, or a larger one, is a FileResponse): at most
# 64 KiB held per download in flight.
SMALL_ARTIFACT = 64 * 1024


@router.get(
    "/artifacts/{sha256}",
    summary="Artifact bytes (HTTP Range supported); a viewer token, or a device's download token",
    response_class=FileResponse,
    responses={
        206: {"description": "Partial content"},
        307: {"description": "The bytes are at `artifact_base_url`/sha256 (object storage or a CDN)"},
        416: {"description": "Range not satisfiable"},
    },
)
def get_artifact(
    sha256: Annotated[str, Path(pattern=r"^[0-9a-f]{64}$", description="Hex sha256 of the artifact.")],
    request: Request,
    coordinator: CoordinatorDep,
    device: Annotated[DeviceId | None, Query(description="The downloading device (with `token`).")] = None,
    token: Annotated[str | None, Query(max_length=128, description="The device's download token.")] = None,
) -> Response:
    """The artifact's bytes (Range answered with 206 or 416), or 307 to `artifact_base_url`/sha256 when set."""
    authorize_download(request, coordinator, sha256)
    path = coordinator.store.path(sha256)  # an unknown digest is a 404 here, not a redirect to one
    base = coordinator.settings.artifact_base_url
    if base is not None:
        # No token in the target: object storage keys by digest, and the device checks the digest itself.
        return RedirectResponse(f"{base}/{sha256}", status_code=307, headers={"Cache-Control": "no-store"})
    # Here, in the endpoint's worker thread: else the response stats the file in a thread-pool hop of its own.
    stat_result = os.stat(path)
    # The digest is the strongest validator there is: If-Range resumes survive a restore that changes mtime.
    headers = {"Cache-Control": "private, immutable", "ETag": f'"{sha256}"'}
    if stat_result.st_size <= SMALL_ARTIFACT and "range" not in request.headers:
        # Read here too: a FileResponse opens, reads and closes the file in three thread-pool hops more.
        headers |= {"Last-Modified": formatdate(stat_result.st_mtime, usegmt=True), "Accept-Ranges": "bytes"}
        return Response(path.read_bytes(), media_type="application/octet-stream", headers=headers)
    return ArtifactFileResponse(path, stat_result=stat_result, media_type="application/octet-stream", headers=headers)


class ArtifactFileResponse(FileResponse):
    """Starlette's FileResponse with 1 MiB reads: a 64 KiB read is a thread-pool hop per 64 KiB of model."""

    chunk_size = 1024 * 1024


def authorize_download(request: Request, coordinator: CoordinatorDep, sha256: str) -> None:
    """A device's download token (`device`, `token` query parameters) or any valid bearer token; else 401."""
    device, token = request.query_params.get("device"), request.query_params.get("token")
    if device is not None and token is not None:
        _check_device_token(coordinator, device, token, sha256)
    else:
        get_principal(request, coordinator, _bearer_of(request))


def _check_device_token(coordinator: CoordinatorDep, device_id: str, token: str, sha256: str) -> None:
    if not token_matches(token, artifact_token(coordinator.artifact_secret, device_id, sha256)):
        raise UnauthorizedError("the download token does not match this device and artifact")
    with Session(coordinator.engine) as session:
        check_enrolled(session=session, device_id=device_id)  # a revoked device's links die with it


def _bearer_of(request: Request) -> HTTPAuthorizationCredentials | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value:
        return None
    return HTTPAuthorizationCredentials(scheme="Bearer", credentials=value.strip())
