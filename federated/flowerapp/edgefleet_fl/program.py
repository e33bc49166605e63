"""The model every process of a run trains or aggregates: the parent version's trainable form, carried in the FAB.

The coordinator writes `trainable.json` beside pyproject.toml: `{"format": "torch.export", "sha256": ...,
"program_b64": ...}` (a FAB carries text files only). Its bytes are checked against the sha256 before torch
loads them. torch is imported here only, inside the functions: a message that fails before training (no
samples, bad config) does not pay for importing it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
from pathlib import Path
from typing import Any

__all__ = ["FORMAT", "ProgramError", "load_program", "program_bytes", "trainable_json"]

FORMAT = "torch.export"


class ProgramError(ValueError):
    """The FAB's trainable form is missing, damaged or not what this app reads."""


def trainable_json() -> Path:
    """`trainable.json` at the root of the installed app (beside pyproject.toml)."""
    return Path(__file__).resolve().parent.parent / "trainable.json"


def program_bytes(path: Path | None = None) -> bytes:
    """The `.pt2` bytes from `trainable.json`, checked against the sha256 it states."""
    path = path or trainable_json()
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ProgramError(f"the app's trainable form {path} cannot be read: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ProgramError(f"{path}: expected format {FORMAT!r}, got {document.get('format')!r}")
    try:
        data = base64.b64decode(str(document.get("program_b64", "")), validate=True)
    except binascii.Error as exc:
        raise ProgramError(f"{path}: program_b64 is not base64 ({exc})") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != document.get("sha256"):
        raise ProgramError(f"{path}: the program's sha256 is {digest}, the file says {document.get('sha256')}")
    return data


def load_program(data: bytes) -> tuple[Any, tuple[int, ...]]:
    """(trainable module, one example's input shape without the batch axis) of a torch.export program.

    The module's parameters require grad; never call its `.train()` (it raises: the graph is fixed as exported).
    """
    import torch

    torch.set_num_threads(1)  # devices run this beside their inference server; the training here is tiny
    program = torch.export.load(io.BytesIO(data))
    names = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    if len(names) != 1:
        raise ProgramError(f"the trainable form has {len(names)} inputs; this app trains single-input models")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == names[0])
    return program.module(), tuple(int(d) for d in node.meta["val"].shape[1:])
