"""One reading of an ONNX model's declared tensors, for the registry and for `edgefleet compress`.

Inputs are the graph's inputs that are not initializers; symbolic or unknown dimensions become -1; an
element type devices cannot serve is refused (`TensorSpecError`) rather than guessed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protocol.errors import TensorSpecError
from protocol.messages import ONNX_DATATYPES, TensorSpec

__all__ = ["onnx_tensor_specs"]


def onnx_tensor_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """`(inputs, outputs)` of the ONNX graph at `path`; `TensorSpecError` if it does not parse or cannot be served."""
    try:
        import onnx  # imported here: the package is heavy, and only model readers need it
    except ImportError as exc:  # an agent-only install has no onnx package
        raise TensorSpecError("reading ONNX tensors needs the `onnx` package (pip install onnx)") from exc
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError or ValueError depending on the damage
        raise TensorSpecError(f"file is not a valid ONNX model: {exc}") from exc
    graph = model.graph
    if not graph.node and not graph.input:
        raise TensorSpecError("file is not a valid ONNX model: the graph is empty")
    initializers = {init.name for init in graph.initializer}
    inputs = [_spec(value, onnx) for value in graph.input if value.name not in initializers]
    outputs = [_spec(value, onnx) for value in graph.output]
    if not inputs:
        raise TensorSpecError("ONNX model declares no inputs")
    return inputs, outputs


def _spec(value: Any, onnx: Any) -> TensorSpec:
    tensor_type = value.type.tensor_type
    elem = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
    datatype = ONNX_DATATYPES.get(elem)
    if datatype is None:
        raise TensorSpecError(f"ONNX tensor {value.name!r} has type {elem}, which devices cannot serve")
    shape = [dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else -1 for dim in tensor_type.shape.dim]
    return TensorSpec(name=value.name, datatype=datatype, shape=shape)
