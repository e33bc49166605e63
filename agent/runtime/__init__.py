"""Model runtimes behind one small interface: `ModelRuntime.load(path) -> LoadedModel`.

ONNX Runtime for `ModelFormat.ONNX`, LiteRT for `ModelFormat.TFLITE` (when installed).
"""

from agent.runtime._tensors import check_inputs, datatype_of, numpy_dtype, warmup_inputs
from agent.runtime.base import LoadedModel, ModelRuntime
from agent.runtime.catalog import RuntimeCatalog, available_runtimes, default_catalog
from agent.runtime.onnx import OnnxModel, OnnxRuntime
from agent.runtime.tflite import LiteRtModel, LiteRtRuntime

__all__ = [
    "LiteRtModel",
    "LiteRtRuntime",
    "LoadedModel",
    "ModelRuntime",
    "OnnxModel",
    "OnnxRuntime",
    "RuntimeCatalog",
    "available_runtimes",
    "check_inputs",
    "datatype_of",
    "default_catalog",
    "numpy_dtype",
    "warmup_inputs",
]
