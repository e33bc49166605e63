"""Declared tensors of an ONNX file: one reading for the registry and `edgefleet compress`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from protocol.errors import TensorSpecError
from protocol.messages import Datatype, TensorSpec
from protocol.tensors import onnx_tensor_specs


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _matmul_model(input_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """`logits = input @ weight`, with a symbolic batch dimension and the weight as an initializer."""
    weight = numpy_helper.from_array(np.ones((4, 3), dtype=np.float32), name="weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "weight"], ["logits"])],
        "tiny",
        inputs=[
            helper.make_tensor_value_info("input", input_type, ["batch", 4]),
            helper.make_tensor_value_info("weight", TensorProto.FLOAT, [4, 3]),
        ],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[weight],
    )
    return helper.make_model(graph)


def test_symbolic_batch_dimension_reads_as_minus_one_and_initializers_are_not_inputs(tmp_path: Path) -> None:
    inputs, outputs = onnx_tensor_specs(_save(_matmul_model(), tmp_path / "tiny.onnx"))
    assert inputs == [TensorSpec(name="input", datatype=Datatype.FP32, shape=[-1, 4])]
    assert outputs == [TensorSpec(name="logits", datatype=Datatype.FP32, shape=[-1, 3])]


def test_file_that_is_not_onnx_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x00this is not a protobuf at all\xff" * 8)
    with pytest.raises(TensorSpecError, match="not a valid ONNX model"):
        onnx_tensor_specs(path)


def test_tensor_type_devices_cannot_serve_is_refused_not_guessed(tmp_path: Path) -> None:
    path = _save(_matmul_model(TensorProto.STRING), tmp_path / "strings.onnx")
    with pytest.raises(TensorSpecError, match="'input' has type STRING"):
        onnx_tensor_specs(path)
