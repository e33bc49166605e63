"""Tensor datatypes (Open Inference Protocol names ↔ numpy) and checks of inputs against declared specs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from agent.errors import InferenceInputError
from protocol import Datatype, TensorSpec

__all__ = ["check_inputs", "datatype_of", "numpy_dtype", "warmup_inputs"]

_NUMPY: dict[Datatype, np.dtype] = {
    Datatype.BOOL: np.dtype(np.bool_),
    Datatype.UINT8: np.dtype(np.uint8),
    Datatype.INT8: np.dtype(np.int8),
    Datatype.INT16: np.dtype(np.int16),
    Datatype.INT32: np.dtype(np.int32),
    Datatype.INT64: np.dtype(np.int64),
    Datatype.FP16: np.dtype(np.float16),
    Datatype.FP32: np.dtype(np.float32),
    Datatype.FP64: np.dtype(np.float64),
}
_DATATYPE = {dtype: datatype for datatype, dtype in _NUMPY.items()}


def numpy_dtype(datatype: Datatype) -> np.dtype:
    """The numpy dtype of an Open Inference Protocol datatype."""
    return _NUMPY[datatype]


def datatype_of(dtype: np.dtype) -> Datatype:
    """The Open Inference Protocol datatype of a numpy dtype; `InferenceInputError` if it has none."""
    try:
        return _DATATYPE[np.dtype(dtype)]
    except KeyError:
        raise InferenceInputError(f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None


def shape_fits(declared: Sequence[int], actual: Sequence[int]) -> bool:
    """True when `actual` has the declared rank and matches every static (non-negative) dimension."""
    return len(declared) == len(actual) and all(d < 0 or d == a for d, a in zip(declared, actual, strict=True))


def check_inputs(specs: Sequence[TensorSpec], inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return `inputs` in declared order, or raise `InferenceInputError` naming what does not fit."""
    expected = {spec.name for spec in specs}
    unknown = sorted(set(inputs) - expected)
    if unknown:
        raise InferenceInputError(f"unknown input(s) {unknown}; the model takes {sorted(expected)}")
    checked: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in inputs:
            raise InferenceInputError(f"missing input {spec.name!r}")
        array = inputs[spec.name]
        if not isinstance(array, np.ndarray):
            raise InferenceInputError(f"input {spec.name!r} is a {type(array).__name__}, expected a numpy array")
        if array.dtype != numpy_dtype(spec.datatype):
            raise InferenceInputError(f"input {spec.name!r} must be {spec.datatype.value}, got {array.dtype}")
        if not shape_fits(spec.shape, array.shape):
            raise InferenceInputError(
                f"input {spec.name!r} has shape {list(array.shape)}, the model expects {spec.shape} (-1 = any)"
            )
        checked[spec.name] = array
    return checked


def warmup_inputs(specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Zeros of every declared input, dynamic dimensions set to 1."""
    return {
        spec.name: np.zeros([d if d >= 0 else 1 for d in spec.shape], dtype=numpy_dtype(spec.datatype))
        for spec in specs
    }
