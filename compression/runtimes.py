"""Thin wrappers that run a classifier file in its real runtime: ONNX Runtime or LiteRT.

Both take FP32 inputs and return FP32 logits, whatever the model's own I/O types: a full-int8
LiteRT model takes int8 input and gives int8 output, so the wrapper quantizes and dequantizes with the
scale and zero point stored in the model (what a device runtime must do too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from compression.errors import ConverterUnavailableError, InvalidInputError

__all__ = ["Classifier", "LiteRTClassifier", "OnnxClassifier", "open_classifier", "runtime_for"]


class Classifier(Protocol):
    """A loaded model that maps FP32 samples to logits."""

    runtime: str
    sample_shape: tuple[int, ...]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch `[n, *sample_shape]`."""
        ...

    def predict_one(self, x: np.ndarray) -> np.ndarray:
        """Logits for one sample `[1, *sample_shape]` (the latency path)."""
        ...


class OnnxClassifier:
    """An ONNX model in ONNX Runtime's CPU provider, single-threaded intra-op for steady latency."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, *, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unloadable models
            raise InvalidInputError(f"{path}: ONNX Runtime cannot load this model ({exc})") from exc
        model_input = self._session.get_inputs()[0]
        self._input_name = model_input.name
        self.sample_shape = tuple(int(d) if isinstance(d, int) else 1 for d in model_input.shape[1:])

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch."""
        out = self._session.run(None, {self._input_name: np.ascontiguousarray(x, dtype=np.float32)})
        return np.asarray(out[0], dtype=np.float32)

    def predict_one(self, x: np.ndarray) -> np.ndarray:
        """Logits for one sample."""
        return self.predict(x)


class LiteRTClassifier:
    """A `.tflite` model in the LiteRT interpreter (batch 1, as converted)."""

    runtime = "litert"

    def __init__(self, path: Path, *, threads: int = 1) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as exc:
            raise ConverterUnavailableError("LiteRT is not installed: pip install 'edgefleet[tflite]'") from exc
        try:
            self._interpreter = Interpreter(model_path=str(path), num_threads=threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise InvalidInputError(f"{path}: LiteRT cannot load this model ({exc})") from exc
        self._input: dict[str, Any] = self._interpreter.get_input_details()[0]
        self._output: dict[str, Any] = self._interpreter.get_output_details()[0]
        self.sample_shape = tuple(int(d) for d in self._input["shape"][1:])

    @property
    def io_dtype(self) -> str:
        """The model's own input type (`float32` or `int8`)."""
        return np.dtype(self._input["dtype"]).name

    def predict_one(self, x: np.ndarray) -> np.ndarray:
        """Logits for one sample, quantizing the input and dequantizing the output if the model is int8."""
        self._interpreter.set_tensor(self._input["index"], _to_model(x, self._input))
        self._interpreter.invoke()
        return _from_model(self._interpreter.get_tensor(self._output["index"]), self._output)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch, one invocation per sample."""
        return np.concatenate([self.predict_one(x[i : i + 1]) for i in range(len(x))])


def _to_model(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype == np.float32:
        return np.ascontiguousarray(x, dtype=np.float32)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(dtype)


def _from_model(y: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    if np.dtype(detail["dtype"]) == np.float32:
        return np.array(y, dtype=np.float32)
    scale, zero_point = detail["quantization"]
    return ((y.astype(np.float32) - zero_point) * scale).astype(np.float32)


def runtime_for(path: Path) -> str:
    """The runtime a model file needs, from its suffix."""
    if path.suffix == ".onnx":
        return "onnxruntime"
    if path.suffix == ".tflite":
        return "litert"
    raise InvalidInputError(f"{path}: unknown model format (expected .onnx or .tflite)")


def open_classifier(path: Path, *, threads: int = 1) -> Classifier:
    """Load a model file in the runtime its format needs."""
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such model file")
    if runtime_for(path) == "onnxruntime":
        return OnnxClassifier(path, threads=threads)
    return LiteRTClassifier(path, threads=threads)
