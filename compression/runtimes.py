"""Thin wrappers that run a model file in its real runtime (ONNX Runtime or LiteRT) and return one output.

Both take FP32 inputs of any batch and return the chosen output (the first by default) as the model
computes it, whatever the model's own I/O types: a full-int8 LiteRT model takes int8 input and gives int8
output, so the wrapper quantizes and dequantizes with the scale and zero point stored in the model (what a
device runtime must do too). A model with a fixed batch (a TFLite conversion, or an ONNX export without a
dynamic batch axis) is run in chunks of that batch, the last one padded; the padding rows are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from compression.data import fixed_batches
from compression.errors import ConverterUnavailableError, InvalidInputError

__all__ = ["Classifier", "LiteRTClassifier", "OnnxClassifier", "open_classifier", "runtime_for"]


class Classifier(Protocol):
    """A loaded model that maps FP32 samples to one of its outputs (class scores, class ids or values)."""

    runtime: str
    sample_shape: tuple[int, ...]
    batch: int | None  # the model's fixed batch, or None when it takes any

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The output for a batch `[n, *sample_shape]`, any n."""
        ...

    def predict_one(self, x: np.ndarray) -> np.ndarray:
        """The output for one sample `[1, *sample_shape]` (the latency path)."""
        ...


def _batched(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int | None) -> np.ndarray:
    if batch is None or len(x) == batch:
        return run(x)
    return np.concatenate([run(chunk)[:rows] for chunk, rows in fixed_batches(x, batch)])


class OnnxClassifier:
    """An ONNX model in ONNX Runtime's CPU provider, single-threaded intra-op for steady latency."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, *, output: str | None = None, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # failures reach us as exceptions; keep ORT's warnings off the console
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unloadable models
            raise InvalidInputError(f"{path}: ONNX Runtime cannot load this model ({exc})") from exc
        self._path = path
        model_input = self._session.get_inputs()[0]
        self._input_name = model_input.name
        self.sample_shape = tuple(int(d) if isinstance(d, int) else 1 for d in model_input.shape[1:])
        first = model_input.shape[0] if model_input.shape else None
        self.batch = first if isinstance(first, int) and first > 0 else None
        names = [o.name for o in self._session.get_outputs()]
        if output is not None and output not in names:
            raise InvalidInputError(f"{path.name}: the model has no output {output!r} (it has {names})")
        self._output = output or names[0]

    def _run(self, x: np.ndarray) -> np.ndarray:
        try:
            (out,) = self._session.run([self._output], {self._input_name: np.ascontiguousarray(x, dtype=np.float32)})
        except Exception as exc:  # onnxruntime raises its own exception types; wrap them at the boundary
            raise InvalidInputError(f"{self._path.name}: ONNX Runtime failed to run the model ({exc})") from exc
        return np.asarray(out)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The output for a batch (in chunks of the model's fixed batch, if it has one)."""
        return _batched(self._run, x, self.batch)

    def predict_one(self, x: np.ndarray) -> np.ndarray:
        """The output for one sample."""
        return self.predict(x)


class LiteRTClassifier:
    """A `.tflite` model in the LiteRT interpreter, run at the batch it was converted with."""

    runtime = "litert"

    def __init__(self, path: Path, *, output: str | None = None, threads: int = 1) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as exc:
            raise ConverterUnavailableError("LiteRT is not installed: pip install 'edgefleet[tflite]'") from exc
        try:
            self._interpreter = Interpreter(model_path=str(path), num_threads=threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise InvalidInputError(f"{path}: LiteRT cannot load this model ({exc})") from exc
        self._path = path
        self._input: dict[str, Any] = self._interpreter.get_input_details()[0]
        self._output: dict[str, Any] = self._output_detail(output)
        self.sample_shape = tuple(int(d) for d in self._input["shape"][1:])
        self.batch: int | None = int(self._input["shape"][0])

    def _output_detail(self, name: str | None) -> dict[str, Any]:
        """The detail of output `name`: a signature name (the ONNX model's, see `compression.variants`)."""
        signatures = self._interpreter.get_signature_list()
        if not signatures:
            if name is not None:
                raise InvalidInputError(f"{self._path.name}: the TFLite model has no signature naming {name!r}")
            return dict(self._interpreter.get_output_details()[0])
        outputs = self._interpreter.get_signature_runner(next(iter(signatures))).get_output_details()
        if name is None:
            return dict(next(iter(outputs.values())))
        if name not in outputs:
            raise InvalidInputError(f"{self._path.name}: the TFLite model has no output {name!r} ({list(outputs)})")
        return dict(outputs[name])

    @property
    def io_dtype(self) -> str:
        """The model's own input type (`float32` or `int8`)."""
        return np.dtype(self._input["dtype"]).name

    def _run(self, x: np.ndarray) -> np.ndarray:
        try:
            self._interpreter.set_tensor(self._input["index"], _to_model(x, self._input))
            self._interpreter.invoke()
        except (ValueError, RuntimeError) as exc:
            raise InvalidInputError(f"{self._path.name}: LiteRT failed to run the model ({exc})") from exc
        return _from_model(self._interpreter.get_tensor(self._output["index"]), self._output)

    def predict_one(self, x: np.ndarray) -> np.ndarray:
        """The output for one sample, quantizing the input and dequantizing the output if the model is int8."""
        return self.predict(x)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The output for a batch, one invocation per chunk of the model's batch."""
        return _batched(self._run, x, self.batch)


def _to_model(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail["quantization"]
    if dtype not in (np.dtype(np.int8), np.dtype(np.uint8)) or not scale:
        return np.ascontiguousarray(x, dtype=dtype)
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(dtype)


def _from_model(y: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    if np.dtype(detail["dtype"]) not in (np.dtype(np.int8), np.dtype(np.uint8)) or not scale:
        return np.array(y, copy=True)  # float, or a genuinely integer output (class ids): as computed
    return ((y.astype(np.float32) - zero_point) * scale).astype(np.float32)


def runtime_for(path: Path) -> str:
    """The runtime a model file needs, from its suffix."""
    if path.suffix == ".onnx":
        return "onnxruntime"
    if path.suffix == ".tflite":
        return "litert"
    raise InvalidInputError(f"{path}: unknown model format (expected .onnx or .tflite)")


def open_classifier(path: Path, *, output: str | None = None, threads: int = 1) -> Classifier:
    """Load a model file in the runtime its format needs; `output` names the output to return (default: first)."""
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such model file")
    if runtime_for(path) == "onnxruntime":
        return OnnxClassifier(path, output=output, threads=threads)
    return LiteRTClassifier(path, output=output, threads=threads)
