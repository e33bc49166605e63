"""Verification of downloaded artifacts against what the desired state declares.

This is the one explicit verification step of the update path. Today it checks size and sha256;
signed metadata (TUF, k-of-n approvals) will extend it here, so the agent's state machine keeps
calling a single `verify_artifact`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from protocol.errors import ArtifactSizeMismatchError, DigestMismatchError
from protocol.messages import ArtifactRef

_CHUNK = 1024 * 1024


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_artifact(path: Path, expected: ArtifactRef) -> None:
    """Raise a `VerificationError` unless the file at `path` has the expected size and sha256."""
    size = path.stat().st_size
    if size != expected.size:
        raise ArtifactSizeMismatchError(f"artifact is {size} bytes, expected {expected.size}")
    actual = sha256_file(path)
    if actual != expected.sha256:
        raise DigestMismatchError(f"artifact sha256 is {actual}, expected {expected.sha256}")
