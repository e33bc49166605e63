"""LiteRT (TFLite) behind the `ModelRuntime` interface: `ai_edge_litert`, else `tflite_runtime`.

A LiteRT interpreter is not thread-safe, so each model serializes its invocations with a lock. Tensor
names are the model's signature names when it has a signature (`args_0`, `output_0`, ...).

A fully quantized model (int8/uint8 inputs and outputs, e.g. compression's `tflite-int8`) is served
with FP32 tensors like any other: inputs are quantized and outputs dequantized with each tensor's own
scale and zero point, so clients send the same FP32 request to the ONNX and the TFLite variant.

TFLite converters fix the batch (litert-torch converts at the example's batch), while the ONNX variants of
the same version usually take any. So that every variant serves the same requests, a model whose inputs and
outputs all lead with the same batch B is declared with a dynamic batch (-1) and served any batch:

| the model                                              | a request of batch N != B                          |
|--------------------------------------------------------|----------------------------------------------------|
| has a dynamic batch (`shape_signature` -1)             | runs at N                                          |
| resizes (checked at load: batch B+1 allocates and runs, | runs at N: the inputs are resized and the tensors  |
| and every output follows it)                           | reallocated (`ResizeInputTensor`, `AllocateTensors`) |
| does not resize (e.g. a RESHAPE to a constant shape)   | runs in chunks of B, the last padded, padding dropped |
| has tensors without a shared leading batch             | declared as it is; another batch is a clear 400    |

The signature runner resizes and reallocates on every call whose shapes differ (`resize_tensor_input` itself
refuses while a runner holds the interpreter); the same API in `tflite_runtime` 2.14 and LiteRT.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent.errors import InferenceFailedError, InferenceInputError, InvalidModelError
from agent.runtime._tensors import check_inputs, datatype_of
from agent.runtime.base import DeclaredTensors
from protocol import Datatype, ModelFormat, TensorSpec

__all__ = ["Batching", "LiteRtModel", "LiteRtRuntime", "interpreter_module", "leading_batch", "probe_batching"]


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


def _spec(name: str, detail: Mapping[str, Any], quantized: bool, any_batch: bool = False) -> TensorSpec:
    try:
        datatype = Datatype.FP32 if quantized else datatype_of(np.dtype(detail["dtype"]))
    except Exception as exc:
        raise InvalidModelError(f"tensor {name!r} has type {detail['dtype']}, which the agent cannot serve") from exc
    shape = detail.get("shape_signature")
    if shape is None or len(shape) == 0:
        shape = detail["shape"]
    dims = [int(d) if d >= 0 else -1 for d in shape]
    if any_batch and len(dims) >= 2:
        dims[0] = -1  # served any batch (see `Batching`)
    return TensorSpec(name=name, datatype=datatype, shape=dims)


BatchMode = Literal["dynamic", "resize", "split", "fixed"]


@dataclass(frozen=True)
class Batching:
    """How requests of any batch reach a model converted for batch `size` (see the module docstring)."""

    mode: BatchMode
    size: int  # the batch the interpreter was converted (and is allocated) for
    why_fixed: str = ""  # mode "fixed": why no other batch can be served


def leading_batch(shapes: list[list[int]]) -> int | None:
    """The batch B that every tensor shape leads with (rank >= 2), or None when they do not share one."""
    firsts = {shape[0] if len(shape) >= 2 else None for shape in shapes}
    if len(firsts) != 1:
        return None
    (first,) = firsts
    return first if first is not None and first > 0 else None


def _signature_runner(interpreter: Any) -> Any:
    signatures = interpreter.get_signature_list()
    if not signatures:
        raise InvalidModelError("the TFLite model has no signature; re-export it with one")
    return interpreter.get_signature_runner(next(iter(signatures)))


def probe_batching(interpreter: Any) -> Batching:
    """How `interpreter`'s model serves other batches: runs zeros at batch B+1 through the signature runner,
    then at B again. A refused resize may leave the interpreter unusable: the caller serves a fresh one when
    the mode is `split`."""
    runner = _signature_runner(interpreter)
    ins, outs = runner.get_input_details(), runner.get_output_details()
    signature = [list(d.get("shape_signature", d["shape"])) for d in ins.values()]
    if signature and all(len(s) >= 2 and s[0] == -1 for s in signature):
        return Batching("dynamic", 1)
    size = leading_batch([[int(x) for x in d["shape"]] for d in (*ins.values(), *outs.values())])
    if size is None:
        return Batching("fixed", 0, "its inputs and outputs do not share a leading batch dimension")

    def zeros(batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros([batch, *d["shape"][1:]], dtype=d["dtype"]) for n, d in ins.items()}

    try:
        bigger = runner(**zeros(size + 1))
        followed = all(np.shape(y)[:1] == (size + 1,) for y in bigger.values())
        del bigger  # views of the interpreter's buffers
        runner(**zeros(size))
    except (ValueError, RuntimeError):  # e.g. "RESHAPE ... num_input_elements != num_output_elements"
        return Batching("split", size)
    return Batching("resize" if followed else "split", size)


def _in_chunks(feed: dict[str, np.ndarray], size: int) -> list[tuple[dict[str, np.ndarray], int]]:
    """`(chunk, rows)`: the feed cut into batches of exactly `size`, the last padded with its final row."""
    total = len(next(iter(feed.values())))
    chunks = []
    for start in range(0, total, size):
        rows = min(size, total - start)
        chunk = {}
        for name, x in feed.items():
            part = x[start : start + rows]
            chunk[name] = part if rows == size else np.concatenate([part, np.repeat(part[-1:], size - rows, axis=0)])
        chunks.append((chunk, rows))
    return chunks


class LiteRtModel(DeclaredTensors):
    """One interpreter and its signature runner; invocations are serialized; quantized I/O is converted;
    any batch is served as `batching` says."""

    def __init__(self, interpreter: Any, batching: Batching | None = None) -> None:
        runner = _signature_runner(interpreter)
        in_details, out_details = runner.get_input_details(), runner.get_output_details()
        self._in_q = {n: q for n, d in in_details.items() if (q := _quantization(n, d)) is not None}
        self._out_q = {n: q for n, d in out_details.items() if (q := _quantization(n, d)) is not None}
        self._batching = batching or Batching("fixed", 0, "it was loaded without a batch probe")
        any_batch = self._batching.mode != "fixed"
        super().__init__(
            [_spec(n, d, n in self._in_q, any_batch) for n, d in in_details.items()],
            [_spec(n, d, n in self._out_q, any_batch) for n, d in out_details.items()],
        )
        self._runner = runner
        self._interpreter = interpreter  # the runner needs it alive
        self._lock = threading.Lock()

    @property
    def batching(self) -> Batching:
        """How this model serves batches other than the one it was converted for."""
        return self._batching

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the signature on checked inputs; outputs copied out of the interpreter's buffers."""
        self._refuse_other_batch(inputs)
        feed = check_inputs(self._inputs, inputs)
        feed = {n: self._in_q[n].quantize(x) if n in self._in_q else x for n, x in feed.items()}
        batch = len(next(iter(feed.values()))) if feed else 0
        if batch == 0 and self._batching.mode != "fixed":
            raise InferenceInputError("the request has an empty batch (0 rows)")
        split = self._batching.mode == "split" and batch != self._batching.size
        try:
            with self._lock:
                if split:
                    parts = [self._run(chunk, rows) for chunk, rows in _in_chunks(feed, self._batching.size)]
                    outputs = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
                else:
                    outputs = self._run(feed, batch)
        except InferenceFailedError:
            raise
        except Exception as exc:  # LiteRT raises ValueError/RuntimeError for anything; wrap at the boundary
            raise InferenceFailedError(f"LiteRT failed: {exc}") from exc
        return {n: self._out_q[n].dequantize(y) if n in self._out_q else y for n, y in outputs.items()}

    def _run(self, feed: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        """One invocation (the runner resizes to the feed's batch); the first `rows` rows of every output."""
        results = self._runner(**feed)
        outputs = {spec.name: np.array(results[spec.name], copy=True) for spec in self._outputs}
        if self._batching.mode != "fixed":
            wrong = {n: list(y.shape) for n, y in outputs.items() if y.ndim == 0 or len(y) < rows}
            if wrong:
                raise InferenceFailedError(f"LiteRT returned outputs {wrong} for a batch of {rows}")
            outputs = {n: y[:rows] for n, y in outputs.items()}
        return outputs

    def _refuse_other_batch(self, inputs: Mapping[str, np.ndarray]) -> None:
        """A fixed-batch model names its limit rather than a shape mismatch."""
        if self._batching.mode != "fixed":
            return
        for spec in self._inputs:
            array = inputs.get(spec.name)
            if not isinstance(array, np.ndarray) or array.ndim != len(spec.shape) or array.ndim == 0:
                continue
            if spec.shape[0] >= 0 and array.shape[0] != spec.shape[0] and list(array.shape[1:]) == spec.shape[1:]:
                raise InferenceInputError(
                    f"input {spec.name!r} has a batch of {array.shape[0]}; this TFLite model serves a batch of "
                    f"exactly {spec.shape[0]} ({self._batching.why_fixed})"
                )


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
        interpreter = self._open(module, path)
        batching = probe_batching(interpreter)
        if batching.mode == "split":
            interpreter = self._open(module, path)  # the refused resize may have left the probed one unusable
        return LiteRtModel(interpreter, batching)

    def _open(self, module: Any, path: Path) -> Any:
        try:
            interpreter = module.Interpreter(model_path=str(path), num_threads=self._threads)
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise InvalidModelError(f"LiteRT cannot load {path.name}: {exc}") from exc
        return interpreter
