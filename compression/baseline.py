"""The fp32 baseline as one self-contained file: a device receives one artifact, never `model.onnx.data` beside it.

torch's exporter (2.x, `torch.onnx.export(..., external_data=True)` by default) and large models keep their
weights in a separate file. The baseline copy folds them in, and every variant is built from that copy, so
no output of `edgefleet compress` refers to a file that a push would leave behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from compression.errors import InvalidInputError

__all__ = ["PROTOBUF_LIMIT_BYTES", "self_contained_copy"]

PROTOBUF_LIMIT_BYTES = 2**31 - 1  # one serialized ONNX protobuf cannot be larger


def self_contained_copy(source: Path, target: Path) -> Path:
    """Copy the ONNX model `source` to `target` with any external data folded in; returns `target`."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        skeleton = onnx.load_model(str(source), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError or ValueError depending on the damage
        raise InvalidInputError(f"{source}: not a valid ONNX model ({exc})") from exc
    tensors = [*skeleton.graph.initializer, *(a.t for n in skeleton.graph.node for a in n.attribute if a.HasField("t"))]
    external = sorted({_location(t) for t in tensors if uses_external_data(t)})
    target.parent.mkdir(parents=True, exist_ok=True)
    if not external:
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
        return target
    try:
        model = onnx.load_model(str(source))  # reads the external files, relative to the model's directory
    except Exception as exc:  # onnx raises FileNotFoundError, ValueError or its own checker errors
        raise InvalidInputError(
            f"{source.name} keeps its weights in {', '.join(external)}, which could not be read beside it ({exc})"
        ) from exc
    if model.ByteSize() > PROTOBUF_LIMIT_BYTES:
        raise InvalidInputError(
            f"{source.name} with its external data is {model.ByteSize() / 2**30:.1f} GiB; a device receives one "
            "file, and one ONNX file holds at most 2 GiB"
        )
    onnx.save_model(model, str(target))
    return target


def _location(tensor: object) -> str:
    entries = {entry.key: entry.value for entry in getattr(tensor, "external_data", [])}
    return entries.get("location", "external data")
