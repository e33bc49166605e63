"""LiteRT (TFLite) behind the `ModelRuntime` interface: `ai_edge_litert`, else `tflite_runtime`.

A LiteRT interpreter is not thread-safe, so each model serializes its invocations with a lock. Tensor
names are the model's signature names when it has a signature (`args_0`, `output_0`, ...).

A fully quantized model (int8/uint8 inputs and outputs, e.g. compression's `tflite-int8`) is served
with FP32 tensors like any other: inputs are quantized and outputs dequantized with each tensor's own
scale and zero point, so clients send the same FP32 request to the ONNX and the TFLite variant.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import InferenceFailedError, InvalidModelError
from agent.runtime._tensors import check_inputs, datatype_of
from agent.runtime.base import DeclaredTensors
from protocol import Datatype, ModelFormat, TensorSpec

__all__ = ["LiteRtModel", "LiteRtRuntime", "interpreter_module"]


def interpreter_module() -> Any | None:
    """The installed LiteRT interpreter module, or None."""
    try:
        from ai_edge_litert import interpreter

        return interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime import interpreter

        return interpreter
    except ImportError:
        return None


@dataclass(frozen=True)
class _Quantization:
    """Per-tensor affine quantization of a model tensor: real = (q - zero_point) * scale."""

    dtype: np.dtype
    scale: float
    zero_point: int

    def quantize(self, x: np.ndarray) -> np.ndarray:
        info = np.iinfo(self.dtype)
        return np.clip(np.round(x / self.scale) + self.zero_point, info.min, info.max).astype(self.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return ((q.astype(np.float32) - self.zero_point) * self.scale).astype(np.float32)


def _quantization(name: str, detail: Mapping[str, Any]) -> _Quantization | None:
    """The tensor's quantization when it is a quantized integer tensor the agent converts, else None."""
    dtype = np.dtype(detail["dtype"])
    if dtype not in (np.dtype(np.int8), np.dtype(np.uint8)):
        return None
    params = detail.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", []), dtype=np.float64)
    if scales.size == 0 or not np.any(scales):
        return None  # a genuinely integer tensor (no scale): served as it is
    if scales.size > 1:
        raise InvalidModelError(f"tensor {name!r} is quantized per axis; the agent converts per-tensor I/O only")
    zero_points = np.asarray(params.get("zero_points", [0]), dtype=np.int64)
    return _Quantization(dtype=dtype, scale=float(scales[0]), zero_point=int(zero_points[0]) if zero_points.size else 0)


def _spec(name: str, detail: Mapping[str, Any], quantized: bool) -> TensorSpec:
    try:
        datatype = Datatype.FP32 if quantized else datatype_of(np.dtype(detail["dtype"]))
    except Exception as exc:
        raise InvalidModelError(f"tensor {name!r} has type {detail['dtype']}, which the agent cannot serve") from exc
    shape = detail.get("shape_signature")
    if shape is None or len(shape) == 0:
        shape = detail["shape"]
    return TensorSpec(name=name, datatype=datatype, shape=[int(d) if d >= 0 else -1 for d in shape])


class LiteRtModel(DeclaredTensors):
    """One interpreter and its signature runner; invocations are serialized; quantized I/O is converted."""

    def __init__(self, interpreter: Any) -> None:
        signatures = interpreter.get_signature_list()
        if not signatures:
            raise InvalidModelError("the TFLite model has no signature; re-export it with one")
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        in_details, out_details = runner.get_input_details(), runner.get_output_details()
        self._in_q = {n: q for n, d in in_details.items() if (q := _quantization(n, d)) is not None}
        self._out_q = {n: q for n, d in out_details.items() if (q := _quantization(n, d)) is not None}
        super().__init__(
            [_spec(n, d, n in self._in_q) for n, d in in_details.items()],
            [_spec(n, d, n in self._out_q) for n, d in out_details.items()],
        )
        self._runner = runner
        self._interpreter = interpreter  # the runner needs it alive
        self._lock = threading.Lock()

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the signature on checked inputs; outputs copied out of the interpreter's buffers."""
        feed = check_inputs(self._inputs, inputs)
        feed = {n: self._in_q[n].quantize(x) if n in self._in_q else x for n, x in feed.items()}
        try:
            with self._lock:
                results = self._runner(**feed)
                outputs = {spec.name: np.array(results[spec.name], copy=True) for spec in self._outputs}
        except Exception as exc:  # LiteRT raises ValueError/RuntimeError for anything; wrap at the boundary
            raise InferenceFailedError(f"LiteRT failed: {exc}") from exc
        return {n: self._out_q[n].dequantize(y) if n in self._out_q else y for n, y in outputs.items()}


class LiteRtRuntime:
    """Loads `.tflite` files with `intra_op_threads` interpreter threads."""

    format = ModelFormat.TFLITE

    def __init__(self, intra_op_threads: int = 1) -> None:
        self._threads = intra_op_threads

    @property
    def name(self) -> str:
        """`litert-<version>` (or `tflite_runtime-<version>`)."""
        from importlib import metadata

        for dist, label in (("ai-edge-litert", "litert"), ("tflite-runtime", "tflite_runtime")):
            try:
                return f"{label}-{metadata.version(dist)}"
            except metadata.PackageNotFoundError:
                continue
        return "litert"

    def load(self, path: Path) -> LiteRtModel:
        """An interpreter for `path`; `InvalidModelError` if LiteRT refuses it."""
        module = interpreter_module()
        if module is None:
            raise InvalidModelError("LiteRT is not installed (pip install 'edgefleet[tflite]')")
        try:
            interpreter = module.Interpreter(model_path=str(path), num_threads=self._threads)
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise InvalidModelError(f"LiteRT cannot load {path.name}: {exc}") from exc
        return LiteRtModel(interpreter)
