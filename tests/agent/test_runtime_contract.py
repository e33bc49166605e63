"""One contract for every runtime: ONNX Runtime and LiteRT pass the same tests."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent import InferenceInputError, InvalidModelError
from agent.runtime import LiteRtRuntime, ModelRuntime, OnnxRuntime, default_catalog, warmup_inputs
from protocol import Datatype, ModelFormat
from tests.services import require_convert_extra


@dataclass
class Case:
    runtime: ModelRuntime
    path: Path
    input_name: str
    output_name: str


@pytest.fixture(scope="session")
def tflite_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small [1,64] -> [1,10] softmax classifier converted with litert-torch (a few seconds, once)."""
    torch, litert_torch = require_convert_extra()
    litert_torch.config.show_progress = False
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 10), torch.nn.Softmax(dim=1)).eval()
    path = tmp_path_factory.mktemp("tflite") / "classifier.tflite"
    litert_torch.convert(model, (torch.zeros(1, 64),)).export(str(path))
    return path


@pytest.fixture(params=["onnx", pytest.param("tflite", marks=pytest.mark.slow)])
def case(request: pytest.FixtureRequest, digits_model_path: Path) -> Case:
    if request.param == "onnx":
        return Case(OnnxRuntime(), digits_model_path, "input", "probabilities")
    return Case(LiteRtRuntime(), request.getfixturevalue("tflite_classifier"), "args_0", "output_0")


def test_reports_tensors_and_answers_a_warm_up(case: Case) -> None:
    model = case.runtime.load(case.path)
    [spec] = model.inputs
    assert spec.name == case.input_name and spec.datatype is Datatype.FP32 and spec.shape[-1] == 64
    out = model.infer(warmup_inputs(model.inputs))
    probabilities = out[case.output_name]
    assert probabilities.shape == (1, 10) and np.isclose(probabilities.sum(), 1.0, atol=1e-5)


def test_refuses_inputs_that_do_not_fit(case: Case) -> None:
    model = case.runtime.load(case.path)
    with pytest.raises(InferenceInputError):
        model.infer({case.input_name: np.zeros((1, 63), np.float32)})
    with pytest.raises(InferenceInputError):
        model.infer({"nope": np.zeros((1, 64), np.float32)})


def test_refuses_a_file_that_is_not_a_model(case: Case, tmp_path: Path) -> None:
    junk = tmp_path / f"junk.{case.runtime.format.value}"
    junk.write_bytes(b"definitely not a model" * 10)
    with pytest.raises(InvalidModelError):
        case.runtime.load(junk)


def test_concurrent_inferences_agree(case: Case) -> None:
    model = case.runtime.load(case.path)
    x = {case.input_name: np.full((1, 64), 0.25, np.float32)}
    expected = model.infer(x)[case.output_name]
    mismatches: list[np.ndarray] = []

    def worker() -> None:
        for _ in range(50):
            out = model.infer(x)[case.output_name]
            if not np.array_equal(out, expected):
                mismatches.append(out)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not mismatches


def test_default_catalog_has_a_runtime_per_installed_format() -> None:
    catalog = default_catalog()
    assert ModelFormat.ONNX in catalog.formats
    assert ModelFormat.TFLITE in catalog.formats or not any(n.startswith("litert") for n in catalog.names())
