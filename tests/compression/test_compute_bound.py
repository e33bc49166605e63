"""int8-static on a compute-bound model (MobileNetV2): int8 per-channel weights, every convolution an int8 kernel.

Structure and size only (both deterministic); its speed is the benchmark's (benchmarks/bench_compression.py).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from compression.baseline import self_contained_copy
from compression.mobilenet import build_mobilenet, generated_images
from compression.variants import BuiltVariant, build_variant

pytestmark = pytest.mark.slow

CONVOLUTIONS = 52  # MobileNetV2: the stem, 17 inverted-residual blocks (2 or 3 each) and the 1x1 head


@pytest.fixture(scope="module")
def mobilenet_int8(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BuiltVariant]:
    """The exported fp32 MobileNetV2 (self-contained, as `edgefleet compress` keeps it) and its int8-static."""
    out = tmp_path_factory.mktemp("mobilenet")
    files = build_mobilenet(out / "source")
    fp32 = self_contained_copy(files.onnx_path, out / "fp32.onnx")
    variant = build_variant(
        "int8-static",
        onnx_model=fp32,
        torch_program=None,
        calibration=generated_images(32, seed=1),
        out_dir=out,
    )
    return fp32, variant


def test_int8_static_mobilenet_keeps_conv_weights_int8_per_channel_at_under_a_3_5th_of_fp32(
    mobilenet_int8: tuple[Path, BuiltVariant],
) -> None:
    fp32, variant = mobilenet_int8
    model = onnx.load(str(variant.path))
    initializers = {t.name: t for t in model.graph.initializer}
    dequantized = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == CONVOLUTIONS
    for conv in convs:
        weight_dq = dequantized[conv.input[1]]  # the weight reaches the convolution only through a dequantization
        weight, scale = initializers[weight_dq.input[0]], initializers[weight_dq.input[1]]
        assert weight.data_type == onnx.TensorProto.INT8, conv.name
        axis = next((a.i for a in weight_dq.attribute if a.name == "axis"), 1)
        # One scale per output channel (axis 0 of an OIHW weight), not one for the whole tensor.
        assert axis == 0 and list(scale.dims) == [weight.dims[0]], conv.name
        assert numpy_helper.to_array(scale).min() > 0, conv.name
    assert fp32.stat().st_size / variant.size_bytes >= 3.5


def test_int8_static_mobilenet_runs_every_convolution_as_qlinearconv(
    tmp_path: Path, mobilenet_int8: tuple[Path, BuiltVariant]
) -> None:
    _, variant = mobilenet_int8
    options = ort.SessionOptions()
    # Extended: ONNX Runtime's QDQ fusions, before the hardware-specific layout passes of the highest level.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(variant.path), options, providers=["CPUExecutionProvider"])
    ops = Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    assert ops["QLinearConv"] == CONVOLUTIONS and ops["Conv"] == 0, ops
    # Activations stay int8 from the input to the pooling: one quantization in, one dequantization out of it.
    assert ops["QuantizeLinear"] <= 2 and ops["DequantizeLinear"] <= 2, ops
