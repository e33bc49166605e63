"""ONNX Runtime behind the `ModelRuntime` interface (CPU provider, configurable threads)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import InferenceFailedError, InferenceInputError, InvalidModelError
from agent.runtime._tensors import check_inputs, numpy_dtype
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
    """An ONNX Runtime session; `InferenceSession.run` is thread-safe, so no lock is needed.

    Inputs are checked against what was read at load time: the Python side checks only that the feed has as many
    entries as the model has inputs, each a numpy array of an input's declared dtype (an identity test of the
    dtype), and ONNX Runtime checks ranks and static dimensions itself. Any other feed, or one ONNX Runtime
    refuses, goes through `check_inputs`, which says what does not fit (`InferenceInputError`): callers see the
    same errors as before without the full check on every call.
    """

    def __init__(self, session: Any) -> None:
        super().__init__([_spec(arg) for arg in session.get_inputs()], [_spec(arg) for arg in session.get_outputs()])
        self._session = session
        self._output_names = [spec.name for spec in self._outputs]
        self._dtypes = {spec.name: numpy_dtype(spec.datatype) for spec in self._inputs}
        # `InferenceSession.run` is a Python wrapper over the C++ session (`_sess`) that re-validates the feed's
        # names and OrtValue ownership and checks WebGPU graph capture: ~0.5 µs a call, a tenth of a small model's
        # inference, for checks the feed has passed already when it takes the fast path below (numpy arrays, every
        # declared input and no other, CPU provider). The wrapper stays the fallback: for a feed that does not take
        # the fast path, and for an ONNX Runtime without that attribute.
        binding = getattr(session, "_sess", None)
        self._binding_run: Callable[[list[str], dict[str, np.ndarray], None], list[Any]] | None = (
            binding.run if binding is not None and callable(getattr(binding, "run", None)) else None
        )

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session on checked inputs; outputs keyed by name in declared order."""
        dtypes = self._dtypes
        feed = inputs if type(inputs) is dict else dict(inputs)
        run = self._binding_run
        if len(feed) != len(dtypes):
            run = None
        else:
            for name, value in feed.items():
                if type(value) is not np.ndarray or value.dtype is not dtypes.get(name):
                    run = None
                    break
        names = self._output_names
        try:
            if run is not None:
                results = run(names, feed, None)
            else:  # refused here, or an equal dtype or array subclass the checks accept
                results = self._session.run(names, check_inputs(self._inputs, inputs))
        except InferenceInputError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types; wrap them at the boundary
            check_inputs(self._inputs, inputs)  # a feed it refused: name what does not fit
            raise InferenceFailedError(f"onnxruntime failed: {exc}") from exc
        # Every output is a tensor (`_spec` refuses other types at load), so ONNX Runtime returns numpy arrays.
        return dict(zip(names, results, strict=True))


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
