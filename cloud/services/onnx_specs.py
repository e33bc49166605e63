"""Declared inputs and outputs of an ONNX model, read from its graph with the `onnx` package."""

from __future__ import annotations

from pathlib import Path

from cloud.errors import InvalidModelError
from protocol.messages import ONNX_DATATYPES, TensorSpec

__all__ = ["onnx_tensor_specs"]


def onnx_tensor_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """`(inputs, outputs)` of the ONNX graph at `path`; dynamic dimensions become -1.

    `InvalidModelError` if the file does not parse as ONNX or declares a tensor type devices cannot serve.
    """
    import onnx  # imported here: parsing is the only use, and the package is heavy to import

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError or ValueError depending on the damage
        raise InvalidModelError(f"file is not a valid ONNX model: {exc}", field="file") from exc
    graph = model.graph
    if not graph.node and not graph.input:
        raise InvalidModelError("file is not a valid ONNX model: the graph is empty", field="file")
    initializers = {init.name for init in graph.initializer}
    inputs = [_spec(value, onnx) for value in graph.input if value.name not in initializers]
    outputs = [_spec(value, onnx) for value in graph.output]
    if not inputs:
        raise InvalidModelError("ONNX model declares no inputs", field="file")
    return inputs, outputs


def _spec(value: object, onnx: object) -> TensorSpec:
    name = value.name  # type: ignore[attr-defined]
    tensor_type = value.type.tensor_type  # type: ignore[attr-defined]
    elem = onnx.TensorProto.DataType.Name(tensor_type.elem_type)  # type: ignore[attr-defined]
    datatype = ONNX_DATATYPES.get(elem)
    if datatype is None:
        raise InvalidModelError(f"ONNX tensor {name!r} has type {elem}, which devices cannot serve", field="file")
    shape = [dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else -1 for dim in tensor_type.shape.dim]
    return TensorSpec(name=name, datatype=datatype, shape=shape)
