"""Declared tensors of a model file, as the registry records them and the agent serves them.

ONNX: `protocol.tensors.onnx_tensor_specs`, the registry's own reading (an element type devices cannot
serve is refused, not guessed). TFLite: the first signature's tensors; a per-tensor quantized int8/uint8
tensor is declared FP32, because the agent quantizes inputs and dequantizes outputs at the boundary, so
clients call every variant the same way. For the same reason a TFLite model whose inputs and outputs all
lead with the same batch is declared with a dynamic batch (-1): the agent serves it any batch, resizing the
interpreter or running chunks of its batch (`agent.runtime.tflite`, which applies the same rule).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from compression.errors import InvalidInputError
from protocol.errors import TensorSpecError
from protocol.messages import Datatype, TensorSpec
from protocol.tensors import onnx_tensor_specs

__all__ = ["tensor_specs"]

_NUMPY_TYPES = {
    np.dtype(np.float32): Datatype.FP32,
    np.dtype(np.float16): Datatype.FP16,
    np.dtype(np.float64): Datatype.FP64,
    np.dtype(np.int8): Datatype.INT8,
    np.dtype(np.uint8): Datatype.UINT8,
    np.dtype(np.int16): Datatype.INT16,
    np.dtype(np.int32): Datatype.INT32,
    np.dtype(np.int64): Datatype.INT64,
    np.dtype(np.bool_): Datatype.BOOL,
}


def tensor_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """`(inputs, outputs)` of an `.onnx` or `.tflite` file; `InvalidInputError` names the file it cannot read."""
    if path.suffix == ".onnx":
        try:
            return onnx_tensor_specs(path)
        except TensorSpecError as exc:
            raise InvalidInputError(f"{path.name}: {exc}") from exc
    if path.suffix == ".tflite":
        return _tflite_specs(path)
    raise InvalidInputError(f"{path.name}: cannot read tensors of a {path.suffix or 'suffix-less'} file")


def _tflite_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    signatures = interpreter.get_signature_list()
    if not signatures:
        raise InvalidInputError(f"{path.name}: the TFLite model has no signature")
    runner = interpreter.get_signature_runner(next(iter(signatures)))
    inputs = [_tflite_spec(n, d) for n, d in runner.get_input_details().items()]
    outputs = [_tflite_spec(n, d) for n, d in runner.get_output_details().items()]
    leading = {spec.shape[0] if len(spec.shape) >= 2 else None for spec in (*inputs, *outputs)}
    if None not in leading and len(leading - {-1}) <= 1:  # one shared batch (or dynamic): served any batch
        inputs, outputs = _any_batch(inputs), _any_batch(outputs)
    return inputs, outputs


def _any_batch(specs: list[TensorSpec]) -> list[TensorSpec]:
    return [spec.model_copy(update={"shape": [-1, *spec.shape[1:]]}) for spec in specs]


def _tflite_spec(name: str, detail: dict[str, Any]) -> TensorSpec:
    dtype = np.dtype(detail["dtype"])
    scales = np.asarray((detail.get("quantization_parameters") or {}).get("scales", []))
    quantized = dtype in (np.dtype(np.int8), np.dtype(np.uint8)) and scales.size == 1 and bool(np.any(scales))
    shape = detail.get("shape_signature")
    if shape is None or len(shape) == 0:
        shape = detail["shape"]
    datatype = Datatype.FP32 if quantized else _NUMPY_TYPES.get(dtype, Datatype.FP32)
    return TensorSpec(name=name, datatype=datatype, shape=[int(d) if d >= 0 else -1 for d in shape])
