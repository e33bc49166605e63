"""LiteRT (TFLite) behind the `ModelRuntime` interface: `ai_edge_litert`, else `tflite_runtime`.

A LiteRT interpreter is not thread-safe, so each model serializes its invocations with a lock. Tensor
names are the model's signature names when it has a signature (`args_0`, `output_0`, ...).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import InferenceFailedError, InvalidModelError
from agent.runtime._tensors import check_inputs, datatype_of
from agent.runtime.base import DeclaredTensors
from protocol import ModelFormat, TensorSpec

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


def _spec(name: str, detail: Mapping[str, Any]) -> TensorSpec:
    try:
        datatype = datatype_of(np.dtype(detail["dtype"]))
    except Exception as exc:
        raise InvalidModelError(f"tensor {name!r} has type {detail['dtype']}, which the agent cannot serve") from exc
    shape = detail.get("shape_signature")
    if shape is None or len(shape) == 0:
        shape = detail["shape"]
    return TensorSpec(name=name, datatype=datatype, shape=[int(d) if d >= 0 else -1 for d in shape])


class LiteRtModel(DeclaredTensors):
    """One interpreter and its signature runner; invocations are serialized."""

    def __init__(self, interpreter: Any) -> None:
        signatures = interpreter.get_signature_list()
        if not signatures:
            raise InvalidModelError("the TFLite model has no signature; re-export it with one")
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        super().__init__(
            [_spec(n, d) for n, d in runner.get_input_details().items()],
            [_spec(n, d) for n, d in runner.get_output_details().items()],
        )
        self._runner = runner
        self._interpreter = interpreter  # the runner needs it alive
        self._lock = threading.Lock()

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the signature on checked inputs; outputs copied out of the interpreter's buffers."""
        feed = check_inputs(self._inputs, inputs)
        try:
            with self._lock:
                results = self._runner(**feed)
                return {spec.name: np.array(results[spec.name], copy=True) for spec in self._outputs}
        except Exception as exc:  # LiteRT raises ValueError/RuntimeError for anything; wrap at the boundary
            raise InferenceFailedError(f"LiteRT failed: {exc}") from exc


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
