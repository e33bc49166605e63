"""fp16 conversion that ONNX Runtime can load: half-precision weights and kernels, FP32 where they do not fit.

`onnxconverter_common.float16.convert_float_to_float16` alone breaks common graphs: a `Cast(to=FLOAT)` (which
skl2onnx puts after every input) still casts to FP32 after conversion, so the next MatMul sees float and
float16 (`MatMul bound to different types`). Such Casts are kept in FP32 (`node_block_list`), along with
the converter's default blocked ops (ai.onnx.ml, TopK, Resize, ...). The result must then load in ONNX
Runtime; a node it names as mistyped or without an fp16 kernel is kept in FP32 too and the conversion run
again, a bounded number of times. I/O stays FP32 (`keep_io_types`), so clients call fp16 like fp32.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path
from typing import Any

from compression.errors import ConversionError, ConverterUnavailableError

__all__ = ["MAX_ATTEMPTS", "convert_fp16", "fp32_casts"]

MAX_ATTEMPTS = 8
# "... in node (MatMul)." and "Could not find an implementation for Foo(13) node with name 'bar'"
_NODE_IN_ERROR = re.compile(r"in node \((?P<a>[^)]*)\)|node with name '(?P<b>[^']*)'")


def fp32_casts(model: Any) -> set[str]:
    """Names of the nodes that cast to FLOAT: kept in FP32, since the converter leaves their target type alone."""
    from onnx import TensorProto, helper

    return {
        node.name
        for node in model.graph.node
        if node.op_type == "Cast"
        and any(a.name == "to" and helper.get_attribute_value(a) == TensorProto.FLOAT for a in node.attribute)
    }


def convert_fp16(source: Path, target: Path) -> None:
    """Write the fp16 model of `source` to `target`, checked to load in ONNX Runtime (else `ConversionError`)."""
    import onnx

    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise ConverterUnavailableError("onnxconverter-common is missing: pip install 'edgefleet[convert]'") from exc
    model = onnx.load(str(source))
    for index, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{index}"  # the block list names nodes
    blocked = fp32_casts(model)
    error = ""
    for _ in range(MAX_ATTEMPTS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "the float32 number ... will be truncated": expected of fp16
            converted = float16.convert_float_to_float16(
                copy.deepcopy(model), keep_io_types=True, node_block_list=sorted(blocked)
            )
        error = _load_error(converted)
        if not error:
            onnx.save(converted, str(target))
            return
        named = {m.group("a") or m.group("b") for m in _NODE_IN_ERROR.finditer(error)}
        fresh = {name for name in named if name in {n.name for n in model.graph.node}} - blocked
        if not fresh:
            break
        blocked |= fresh
    raise ConversionError(f"the fp16 model does not load in ONNX Runtime: {error}")


def _load_error(model: Any) -> str:
    """Why ONNX Runtime refuses `model`, or "" when it loads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unloadable models
        return str(exc)
    return ""
