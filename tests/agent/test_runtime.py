"""Runtimes behind the `ModelRuntime` interface, and the serving swap under concurrent inferences."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from agent import InferenceInputError, InvalidModelError, NoModelError, UnsupportedFormatError
from agent.runtime import OnnxRuntime, RuntimeCatalog, available_runtimes, default_catalog, warmup_inputs
from agent.serving import ActiveModel, Serving
from compression.reference import shifted_model
from protocol import Datatype, ErrorCode, ModelFormat, TensorSpec
from tests.agent.conftest import model_spec


def test_onnx_model_reports_its_tensors(digits_model_path: Path) -> None:
    model = OnnxRuntime().load(digits_model_path)
    assert model.inputs == [TensorSpec(name="input", datatype=Datatype.FP32, shape=[-1, 64])]
    assert model.outputs == [TensorSpec(name="probabilities", datatype=Datatype.FP32, shape=[-1, 10])]
    out = model.infer(warmup_inputs(model.inputs))
    assert out["probabilities"].shape == (1, 10)


def test_file_that_is_not_onnx_is_an_invalid_model(tmp_path: Path) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(InvalidModelError) as exc_info:
        OnnxRuntime().load(path)
    assert exc_info.value.code is ErrorCode.INVALID_MODEL and not exc_info.value.retryable


@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        ({}, "missing input"),
        ({"input": np.zeros((1, 64), np.float32), "extra": np.zeros(1, np.float32)}, "unknown input"),
        ({"input": np.zeros((1, 63), np.float32)}, "shape"),
        ({"input": np.zeros((64,), np.float32)}, "shape"),
        ({"input": np.zeros((1, 64), np.float64)}, "must be FP32"),
        ({"input": [[0.0] * 64]}, "numpy array"),
        # ONNX Runtime itself would run it, reading the big-endian bytes as little-endian floats.
        ({"input": np.zeros((1, 64), ">f4")}, "must be FP32"),
    ],
)
def test_inputs_that_do_not_fit_are_refused(digits_model_path: Path, inputs: dict, fragment: str) -> None:
    model = OnnxRuntime().load(digits_model_path)
    with pytest.raises(InferenceInputError, match=fragment):
        model.infer(inputs)


def test_catalog_knows_installed_runtimes_and_refuses_unknown_formats() -> None:
    assert any(name.startswith("onnxruntime-") for name in available_runtimes())
    assert default_catalog().for_format(ModelFormat.ONNX).format is ModelFormat.ONNX
    with pytest.raises(UnsupportedFormatError, match="tflite"):
        RuntimeCatalog([OnnxRuntime()]).for_format(ModelFormat.TFLITE)


def test_swap_does_not_break_inferences_in_flight(tmp_path: Path, digits_model_bytes: bytes) -> None:
    serving = Serving()
    with pytest.raises(NoModelError):
        serving.infer({"input": np.zeros((1, 64), np.float32)})
    models = []
    for version, data in (("1.0", digits_model_bytes), ("2.0", shifted_model(digits_model_bytes))):
        path = tmp_path / f"{version}.onnx"
        path.write_bytes(data)
        models.append(ActiveModel(spec=model_spec("digits", version, data), model=OnnxRuntime().load(path)))
    serving.swap(models[0])
    rows = np.random.default_rng(1).random((8, 64), dtype=np.float32)
    expected = {m.spec.version: m.model.infer({"input": rows})["probabilities"] for m in models}
    errors: list[BaseException] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                out = serving.infer({"input": rows})["probabilities"]
                assert any(np.array_equal(out, e) for e in expected.values())
            except BaseException as exc:  # collected and asserted below
                errors.append(exc)
                return

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(50):
        serving.swap(models[i % 2])
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors, errors[0]
