"""Declared tensors of a model file, as the registry records them and the agent serves them.

ONNX: the graph's inputs/outputs (initializers excluded), symbolic dimensions as -1. TFLite: the first
signature's tensors; a per-tensor quantized int8/uint8 tensor is declared FP32, because the agent
quantizes inputs and dequantizes outputs at the boundary, so clients call every variant the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from compression.errors import InvalidInputError
from protocol.messages import ONNX_DATATYPES, Datatype

__all__ = ["tensor_specs"]

_NUMPY_TYPES = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float64): "FP64",
    np.dtype(np.int8): "INT8",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.int16): "INT16",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.bool_): "BOOL",
}

Spec = dict[str, Any]


def tensor_specs(path: Path) -> tuple[list[Spec], list[Spec]]:
    """`(inputs, outputs)` of an `.onnx` or `.tflite` file as `protocol.TensorSpec`-shaped dicts."""
    if path.suffix == ".onnx":
        return _onnx_specs(path)
    if path.suffix == ".tflite":
        return _tflite_specs(path)
    raise InvalidInputError(f"{path.name}: cannot read tensors of a {path.suffix or 'suffix-less'} file")


def _onnx_specs(path: Path) -> tuple[list[Spec], list[Spec]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def spec(value: Any) -> Spec:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        datatype = ONNX_DATATYPES.get(onnx.TensorProto.DataType.Name(tensor.elem_type), Datatype.FP32)
        return {"name": value.name, "datatype": datatype.value, "shape": dims}

    inputs = [spec(v) for v in graph.input if v.name not in initializers]
    return inputs, [spec(v) for v in graph.output]


def _tflite_specs(path: Path) -> tuple[list[Spec], list[Spec]]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    signatures = interpreter.get_signature_list()
    if not signatures:
        raise InvalidInputError(f"{path.name}: the TFLite model has no signature")
    runner = interpreter.get_signature_runner(next(iter(signatures)))

    def spec(name: str, detail: dict[str, Any]) -> Spec:
        dtype = np.dtype(detail["dtype"])
        scales = np.asarray((detail.get("quantization_parameters") or {}).get("scales", []))
        quantized = dtype in (np.dtype(np.int8), np.dtype(np.uint8)) and scales.size == 1 and bool(np.any(scales))
        shape = detail.get("shape_signature")
        if shape is None or len(shape) == 0:
            shape = detail["shape"]
        datatype = "FP32" if quantized else _NUMPY_TYPES.get(dtype, "FP32")
        return {"name": name, "datatype": datatype, "shape": [int(d) if d >= 0 else -1 for d in shape]}

    inputs = [spec(n, d) for n, d in runner.get_input_details().items()]
    outputs = [spec(n, d) for n, d in runner.get_output_details().items()]
    return inputs, outputs
