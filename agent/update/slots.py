"""The two model slots on disk (`data_dir/slots/{a,b}`) and the pointer to the active one.

Layout::

    slots/active          {"format_version": 1, "slot": "a"}   (replaced atomically: the switch)
    slots/a/spec.json     the ModelSpec of the file below (written last: a slot without it is empty)
    slots/a/model.onnx

A slot is staged only while it is inactive, so the serving model's files are never touched.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from agent._fs import atomic_copy, atomic_write_bytes
from agent.errors import StorageError
from agent.update.machine import SLOTS, other_slot
from protocol import ModelRef, ModelSpec, sha256_file

__all__ = ["SlotContent", "SlotStore"]

FORMAT_VERSION = 1
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlotContent:
    """A staged model: its spec and the path of its file."""

    slot: str
    spec: ModelSpec
    path: Path

    @property
    def ref(self) -> ModelRef:
        """Identity of the staged model."""
        return self.spec.ref


class SlotStore:
    """Reads and writes the slots under `root` (`data_dir/slots`)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, slot: str) -> Path:
        if slot not in SLOTS:
            raise ValueError(f"unknown slot {slot!r}")
        return self.root / slot

    @property
    def _pointer(self) -> Path:
        return self.root / "active"

    def active_slot(self) -> str | None:
        """The slot the serving model comes from, or None before the first switch."""
        try:
            data = json.loads(self._pointer.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("unreadable active-slot pointer %s (%s); treating as no active slot", self._pointer, exc)
            return None
        slot = data.get("slot") if isinstance(data, dict) else None
        return slot if slot in SLOTS else None

    def inactive_slot(self) -> str:
        """The slot an update stages into."""
        return other_slot(self.active_slot())

    def read(self, slot: str, *, verify: bool = True) -> SlotContent | None:
        """The model in `slot`, or None if it is empty, incomplete or (with `verify`) fails its sha256."""
        directory = self._dir(slot)
        try:
            spec = ModelSpec.model_validate_json((directory / "spec.json").read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            log.warning("slot %s has an unusable spec.json (%s); treating it as empty", slot, exc)
            return None
        path = directory / _model_file(spec)
        try:
            if verify and sha256_file(path) != spec.artifact.sha256:
                log.warning("slot %s: %s does not match its sha256; treating the slot as empty", slot, path.name)
                return None
        except OSError as exc:
            log.warning("slot %s: cannot read %s (%s); treating the slot as empty", slot, path.name, exc)
            return None
        return SlotContent(slot=slot, spec=spec, path=path)

    def active(self) -> SlotContent | None:
        """The verified content of the active slot, if any."""
        slot = self.active_slot()
        return self.read(slot) if slot is not None else None

    def stage(self, slot: str, source: Path, spec: ModelSpec) -> SlotContent:
        """Copy `source` into `slot` (temp file + `os.replace`) and record `spec`; `StorageError` on disk errors."""
        if slot == self.active_slot():
            raise StorageError(f"refusing to stage into the active slot {slot!r}")
        directory = self._dir(slot)
        path = directory / _model_file(spec)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # Empty the slot first: a crash mid-way leaves a slot without spec.json, which reads as empty.
            (directory / "spec.json").unlink(missing_ok=True)
            for old in directory.glob("model.*"):
                if old != path:
                    old.unlink(missing_ok=True)
            atomic_copy(source, path)
            atomic_write_bytes(directory / "spec.json", spec.model_dump_json(indent=2).encode())
        except OSError as exc:
            raise StorageError(f"cannot stage into slot {slot}: {exc}") from exc
        return SlotContent(slot=slot, spec=spec, path=path)

    def activate(self, slot: str) -> None:
        """Atomically make `slot` the active one (the on-disk half of the switch)."""
        self._dir(slot)
        try:
            atomic_write_bytes(self._pointer, json.dumps({"format_version": FORMAT_VERSION, "slot": slot}).encode())
        except OSError as exc:
            raise StorageError(f"cannot switch the active slot to {slot}: {exc}") from exc


def _model_file(spec: ModelSpec) -> str:
    return f"model.{spec.artifact.format.value}"
