"""ONNX Runtime behind the `ModelRuntime` interface (CPU provider, configurable threads)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import InferenceFailedError, InvalidModelError
from agent.runtime._tensors import check_inputs
from agent.runtime.base import DeclaredTensors
from protocol import Datatype, ModelFormat, TensorSpec

__all__ = ["OnnxModel", "OnnxRuntime"]

_ORT_TYPES = {
    "tensor(bool)": Datatype.BOOL,
    "tensor(uint8)": Datatype.UINT8,
    "tensor(int8)": Datatype.INT8,
    "tensor(int16)": Datatype.INT16,
    "tensor(int32)": Datatype.INT32,
    "tensor(int64)": Datatype.INT64,
    "tensor(float16)": Datatype.FP16,
    "tensor(float)": Datatype.FP32,
    "tensor(double)": Datatype.FP64,
}


def _spec(arg: Any) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type)
    if datatype is None:
        raise InvalidModelError(f"tensor {arg.name!r} has type {arg.type}, which the agent cannot serve")
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or [])]
    return TensorSpec(name=arg.name, datatype=datatype, shape=shape)


class OnnxModel(DeclaredTensors):
    """An ONNX Runtime session; `InferenceSession.run` is thread-safe, so no lock is needed."""

    def __init__(self, session: Any) -> None:
        super().__init__([_spec(arg) for arg in session.get_inputs()], [_spec(arg) for arg in session.get_outputs()])
        self._session = session

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session on checked inputs; outputs keyed by name in declared order."""
        feed = check_inputs(self._inputs, inputs)
        names = [spec.name for spec in self._outputs]
        try:
            results = self._session.run(names, feed)
        except Exception as exc:  # onnxruntime raises its own exception types; wrap them at the boundary
            raise InferenceFailedError(f"onnxruntime failed: {exc}") from exc
        return {name: np.asarray(value) for name, value in zip(names, results, strict=True)}


class OnnxRuntime:
    """Loads `.onnx` files into CPU sessions with `intra_op_threads` threads per inference."""

    format = ModelFormat.ONNX

    def __init__(self, intra_op_threads: int = 1) -> None:
        self._threads = intra_op_threads

    @property
    def name(self) -> str:
        """`onnxruntime-<version>`."""
        import onnxruntime

        return f"onnxruntime-{onnxruntime.__version__}"

    def load(self, path: Path) -> OnnxModel:
        """Create an inference session for `path`; `InvalidModelError` if ONNX Runtime refuses it."""
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors reach us as exceptions; keep ORT's own warnings off stderr
        try:
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # InvalidGraph, InvalidProtobuf, Fail, NoSuchFile ... all mean "not loadable"
            raise InvalidModelError(f"ONNX Runtime cannot load {path.name}: {exc}") from exc
        return OnnxModel(session)
