"""The content-addressed artifact store: files named by their sha256 under `data_dir/artifacts/ab/abcdef…`.

Writes go to a temporary file first and are moved into place with `os.replace`, so a reader never sees
half a file and a crash leaves at most a stray temp file.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Protocol

from cloud.errors import InvalidInputError, NotFoundError

__all__ = ["ArtifactStore", "FileArtifactStore"]

_CHUNK = 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ArtifactStore(Protocol):
    """Where model files live, addressed by their sha256."""

    def put(self, stream: BinaryIO) -> tuple[str, int]:
        """Store the bytes of `stream`; returns `(sha256, size)`."""
        ...

    def path(self, sha256: str) -> Path:
        """Local path of a stored artifact; `NotFoundError` if absent."""
        ...

    def open(self, sha256: str) -> BinaryIO:
        """Open a stored artifact for reading; `NotFoundError` if absent."""
        ...

    def exists(self, sha256: str) -> bool:
        """True if the artifact is stored."""
        ...

    def delete(self, sha256: str) -> None:
        """Remove an artifact if present."""
        ...


class FileArtifactStore:
    """An `ArtifactStore` on the local file system."""

    def __init__(self, root: Path, *, max_bytes: int | None = None) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def _location(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise NotFoundError(f"{sha256!r} is not a sha256 digest (64 lowercase hex characters)")
        return self.root / sha256[:2] / sha256

    def put(self, stream: BinaryIO) -> tuple[str, int]:
        """Hash while copying to a temp file, then move it to its content address."""
        self.root.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=".upload-", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(_CHUNK):
                    size += len(chunk)
                    if self.max_bytes is not None and size > self.max_bytes:
                        raise InvalidInputError(f"artifact exceeds the limit of {self.max_bytes} bytes", field="file")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha256 = digest.hexdigest()
            final = self._location(sha256)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            return sha256, size
        finally:
            tmp.unlink(missing_ok=True)

    def path(self, sha256: str) -> Path:
        """Local path of a stored artifact."""
        location = self._location(sha256)
        if not location.is_file():
            raise NotFoundError(f"artifact {sha256} is not in the store")
        return location

    def open(self, sha256: str) -> BinaryIO:
        """Open a stored artifact for reading."""
        return self.path(sha256).open("rb")

    def exists(self, sha256: str) -> bool:
        """True if the artifact is stored."""
        try:
            return self._location(sha256).is_file()
        except NotFoundError:
            return False

    def delete(self, sha256: str) -> None:
        """Remove an artifact if present."""
        self._location(sha256).unlink(missing_ok=True)
