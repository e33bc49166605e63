"""Each variant runs in its real runtime and stays within the accuracy gate of fp32; broken ones are refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from compression.cnn import ReferenceCNN
from compression.data import Dataset, load_dataset
from compression.evaluate import CompressionReport, LatencyBudget, gate, measure, predictions
from compression.runtimes import LiteRTClassifier, OnnxClassifier, open_classifier
from compression.variants import BuiltVariant, build_variant

pytestmark = pytest.mark.slow

QUICK = LatencyBudget(warmup=2, iterations=20, seconds=0.5)


def test_reference_cnn_is_accurate_and_exports_the_agreed_interface(reference_cnn: ReferenceCNN) -> None:
    model = onnx.load(str(reference_cnn.onnx_path))
    (graph_input,) = model.graph.input
    (graph_output,) = model.graph.output
    dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    assert graph_input.name == "input"
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims[1:] == [1, 8, 8] and isinstance(dims[0], str)  # dynamic batch
    assert graph_output.name == "logits"
    assert [d.dim_value for d in graph_output.type.tensor_type.shape.dim][1:] == [10]
    assert not model.graph.initializer or all(not t.external_data for t in model.graph.initializer)
    assert reference_cnn.accuracy >= 0.95


def test_importing_compression_loads_no_torch_or_converter() -> None:
    heavy = "{'torch', 'litert_torch', 'onnxruntime'}"
    code = f"import sys, compression, compression.cli; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["int8-static", "int8-dynamic", "fp16", "tflite-int8", "tflite-fp32"])
def test_variant_runs_in_its_runtime_within_one_point_of_fp32(
    name: str, built_variants: dict[str, BuiltVariant], eval_set: Dataset
) -> None:
    fp32 = predictions(built_variants["fp32"].path, eval_set)
    variant = built_variants[name]
    classifier = open_classifier(variant.path)
    expected_runtime = LiteRTClassifier if variant.format == "tflite" else OnnxClassifier
    assert isinstance(classifier, expected_runtime)
    predicted = classifier.predict(eval_set.shaped(classifier.sample_shape)).argmax(axis=1)
    fp32_accuracy = float((fp32 == eval_set.y).mean())
    accuracy = float((predicted == eval_set.y).mean())
    assert fp32_accuracy >= 0.95
    assert (fp32_accuracy - accuracy) * 100 <= 1.0, f"{name}: {accuracy:.4f} vs fp32 {fp32_accuracy:.4f}"
    assert float((predicted == fp32).mean()) >= 0.99


def _onnx_ops(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_int8_static_is_qdq_with_int8_weights_and_a_third_of_the_size(built_variants: dict[str, BuiltVariant]) -> None:
    variant = built_variants["int8-static"]
    assert {"QuantizeLinear", "DequantizeLinear"} <= _onnx_ops(variant.path)
    model = onnx.load(str(variant.path))
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    assert int8_weights, "conv/linear weights should be stored as int8"
    assert variant.size_bytes < 0.5 * built_variants["fp32"].size_bytes


def test_int8_dynamic_uses_integer_kernels(built_variants: dict[str, BuiltVariant]) -> None:
    ops = _onnx_ops(built_variants["int8-dynamic"].path)
    assert "DynamicQuantizeLinear" in ops
    assert ops & {"ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul"}


def test_fp16_stores_half_weights_but_keeps_fp32_io(built_variants: dict[str, BuiltVariant]) -> None:
    model = onnx.load(str(built_variants["fp16"].path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = [t for t in model.graph.initializer if len(t.dims) > 1]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)


def test_tflite_int8_runs_int8_kernels_with_quantized_io(built_variants: dict[str, BuiltVariant]) -> None:
    classifier = open_classifier(built_variants["tflite-int8"].path)
    assert isinstance(classifier, LiteRTClassifier)
    assert classifier.io_dtype == "int8"
    assert built_variants["tflite-int8"].size_bytes < 0.5 * built_variants["tflite-fp32"].size_bytes


def test_tflite_and_onnx_of_the_same_network_give_the_same_predictions(
    built_variants: dict[str, BuiltVariant], eval_set: Dataset
) -> None:
    x = eval_set.shaped((1, 8, 8))
    onnx_logits = open_classifier(built_variants["fp32"].path).predict(x)
    tflite_logits = open_classifier(built_variants["tflite-fp32"].path).predict(x)
    # Same float network in two runtimes: identical classes, logits equal up to float reordering.
    np.testing.assert_array_equal(onnx_logits.argmax(1), tflite_logits.argmax(1))
    np.testing.assert_allclose(onnx_logits, tflite_logits, atol=1e-3, rtol=1e-3)
    # Two independent int8 quantizers (ORT QDQ, PT2E) of the same network: measured 99.8-100 % agreement.
    ort_int8 = predictions(built_variants["int8-static"].path, eval_set)
    tfl_int8 = predictions(built_variants["tflite-int8"].path, eval_set)
    assert float((ort_int8 == tfl_int8).mean()) >= 0.99


def test_gate_refuses_int8_calibrated_on_constant_data(
    tmp_path: Path, reference_cnn: ReferenceCNN, built_variants: dict[str, BuiltVariant], eval_set: Dataset
) -> None:
    broken = build_variant(
        "int8-static",
        onnx_model=reference_cnn.onnx_path,
        torch_program=None,
        calibration=load_dataset("digits-constant"),
        out_dir=tmp_path,
    )
    reference = predictions(built_variants["fp32"].path, eval_set)
    baseline = measure("fp32", built_variants["fp32"].path, eval_set, reference, budget=QUICK, memory=False)
    good = measure("int8-static", built_variants["int8-static"].path, eval_set, reference, budget=QUICK, memory=False)
    bad = measure("int8-broken", broken.path, eval_set, reference, budget=QUICK, memory=False)
    assert bad.accuracy < baseline.accuracy - 0.30, f"constant calibration should wreck accuracy: {bad.accuracy}"
    verdicts = gate(CompressionReport(baseline, (good, bad)), max_drop_pp=1.0)
    assert [v.accepted for v in verdicts] == [True, False]
    assert verdicts[1].drop_pp > 30 and "more than the allowed 1 pp" in verdicts[1].reason


def test_measure_reports_latency_and_memory_of_a_fresh_process(
    built_variants: dict[str, BuiltVariant], eval_set: Dataset
) -> None:
    reference = predictions(built_variants["fp32"].path, eval_set)
    m = measure("tflite-int8", built_variants["tflite-int8"].path, eval_set, reference, budget=QUICK)
    assert 0 < m.latency_p50_ms <= m.latency_p99_ms < 1000
    assert 1 <= m.latency_samples <= QUICK.iterations
    # A Python process with numpy and LiteRT is tens of MiB, far below the pytest process holding torch.
    assert m.peak_rss_bytes is not None and m.model_rss_bytes is not None
    assert 10 * 2**20 < m.peak_rss_bytes < 400 * 2**20
    assert 0 <= m.model_rss_bytes < m.peak_rss_bytes
