"""Atomic file writes: temp file in the same directory, fsync, `os.replace`."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_copy", "atomic_write_bytes", "fsync_dir"]


def fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform/filesystem allows opening a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, fill: Callable[[BinaryIO], object]) -> None:
    """Let `fill` write a temp file next to `path`, make it durable, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that readers see either the old or the new content, never a mix."""
    _atomic_write(path, lambda out: out.write(data))


def atomic_copy(source: Path, path: Path) -> None:
    """Copy `source` to `path` through a temp file and `os.replace`."""

    def fill(out: BinaryIO) -> None:
        with source.open("rb") as src:
            shutil.copyfileobj(src, out, 1024 * 1024)

    _atomic_write(path, fill)
