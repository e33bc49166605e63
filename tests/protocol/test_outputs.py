"""Output semantics: which output holds class ids, scores or values, and the predictions read from them."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from protocol import ModelSpec, OutputSemantics, TensorSpec, decode, encode, infer_output_semantics, predictions
from protocol.outputs import OutputsError
from protocol.tensors import onnx_tensor_specs


def spec(name: str, datatype: str, shape: list[int]) -> TensorSpec:
    return TensorSpec(name=name, datatype=datatype, shape=shape)


LABEL = spec("label", "INT64", [-1])
PROBS = spec("probabilities", "FP32", [-1, 10])


@pytest.mark.parametrize(
    ("outputs", "expected"),
    [
        ([LABEL, PROBS], OutputSemantics(kind="classifier", label_output="label", scores_output="probabilities",
                                         scores="probabilities")),
        ([PROBS], OutputSemantics(kind="classifier", scores_output="probabilities", scores="probabilities")),
        ([spec("logits", "FP32", [-1, 10])], OutputSemantics(kind="classifier", scores_output="logits",
                                                             scores="logits")),
        ([spec("out", "FP16", [-1, 3])], OutputSemantics(kind="classifier", scores_output="out")),  # decided per window
        ([spec("label", "INT32", [-1, 1])], OutputSemantics(kind="classifier", label_output="label")),
        ([spec("variable", "FP32", [-1, 1])], OutputSemantics(kind="regressor", value_output="variable")),
        ([spec("y", "FP64", [-1])], OutputSemantics(kind="regressor", value_output="y")),
        ([spec("a", "FP32", [-1, 4]), spec("b", "FP32", [-1, 4])], OutputSemantics(kind="unknown")),
        ([spec("a", "FP32", [-1]), spec("b", "FP32", [-1])], OutputSemantics(kind="unknown")),
        ([spec("image", "FP32", [-1, 3, 8, 8])], OutputSemantics(kind="unknown")),
        ([], OutputSemantics(kind="unknown")),
    ],
)  # fmt: skip
def test_semantics_follow_the_declared_tensors(outputs: list[TensorSpec], expected: OutputSemantics) -> None:
    assert infer_output_semantics(outputs) == expected


@pytest.fixture(scope="module")
def sklearn_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A ZipMap-free skl2onnx MLP classifier and an MLP regressor on the digits, as ONNX files."""
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    from compression.reference import load_digits_split

    split = load_digits_split()
    out = tmp_path_factory.mktemp("sk")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=60, random_state=0).fit(split.x_train, split.y_train)
        reg = MLPRegressor(hidden_layer_sizes=(16,), max_iter=60, random_state=0).fit(split.x_train, split.y_train)
    sample = split.x_train[:1]
    models = {
        "classifier": skl2onnx.to_onnx(clf, sample, options={id(clf): {"zipmap": False}}),
        "regressor": skl2onnx.to_onnx(reg, sample),
    }
    paths = {}
    for name, model in models.items():
        paths[name] = out / f"{name}.onnx"
        paths[name].write_bytes(model.SerializeToString())
    return paths


def run(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {session.get_inputs()[0].name: x}), strict=True))


def test_skl2onnx_classifier_reads_its_label_and_probabilities(sklearn_models: dict[str, Path]) -> None:
    semantics = infer_output_semantics(onnx_tensor_specs(sklearn_models["classifier"])[1])
    assert semantics.kind == "classifier" and semantics.scores_output == "probabilities"
    assert semantics.label_output == "label" and semantics.scores == "probabilities"
    x = np.random.default_rng(0).random((50, 64), dtype=np.float32)
    outputs = run(sklearn_models["classifier"], x)
    got = predictions(semantics, outputs)
    assert got.classes is not None and got.top1 is not None and got.margin is not None
    np.testing.assert_array_equal(got.classes, outputs["label"])
    np.testing.assert_allclose(got.top1, outputs["probabilities"].max(axis=1), rtol=1e-6)
    assert np.all((got.margin >= 0) & (got.margin <= got.top1))


def test_skl2onnx_regressor_reads_its_values(sklearn_models: dict[str, Path]) -> None:
    semantics = infer_output_semantics(onnx_tensor_specs(sklearn_models["regressor"])[1])
    assert semantics.kind == "regressor" and semantics.value_output == "variable"
    x = np.random.default_rng(1).random((7, 64), dtype=np.float32)
    got = predictions(semantics, run(sklearn_models["regressor"], x))
    assert got.values is not None and got.values.shape == (7,) and got.classes is None and got.top1 is None


def test_reference_mlp_probabilities_read_as_a_classifier(digits_model_path: Path) -> None:
    semantics = infer_output_semantics(onnx_tensor_specs(digits_model_path)[1])
    assert semantics == OutputSemantics(kind="classifier", scores_output="probabilities", scores="probabilities")


def test_reference_cnn_logits_are_softmaxed_into_confidence(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from compression.cnn import export_onnx, train_digits_cnn

    model, _ = train_digits_cnn(epochs=1)
    path = export_onnx(model, tmp_path / "cnn.onnx")
    semantics = infer_output_semantics(onnx_tensor_specs(path)[1])
    assert semantics == OutputSemantics(kind="classifier", scores_output="logits", scores="logits")
    x = np.random.default_rng(2).random((5, 1, 8, 8), dtype=np.float32)
    logits = run(path, x)["logits"]
    got = predictions(semantics, {"logits": logits})
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(got.top1, (e / e.sum(axis=1, keepdims=True)).max(axis=1), rtol=1e-6)  # type: ignore[arg-type]
    np.testing.assert_array_equal(got.classes, logits.argmax(axis=1))


def test_undeclared_scores_are_probabilities_only_when_every_row_is_a_distribution() -> None:
    semantics = OutputSemantics(kind="classifier", scores_output="out")
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)
    read = predictions(semantics, {"out": probabilities})
    np.testing.assert_allclose(read.top1, [0.7, 0.8], rtol=1e-6)  # type: ignore[arg-type]
    np.testing.assert_allclose(read.margin, [0.5, 0.7], rtol=1e-5)  # type: ignore[arg-type]
    # One row that does not sum to 1: the whole batch is logits, softmaxed.
    logits = np.array([[0.7, 0.2, 0.1], [2.0, 0.0, 0.0]], dtype=np.float32)
    read = predictions(semantics, {"out": logits})
    assert read.top1 is not None and read.top1[0] == pytest.approx(np.exp(0.7) / np.exp([0.7, 0.2, 0.1]).sum())


def test_declared_logits_are_softmaxed_even_when_they_look_like_probabilities() -> None:
    semantics = OutputSemantics(kind="classifier", scores_output="out", scores="logits")
    read = predictions(semantics, {"out": np.array([[1.0, 0.0]])})
    assert read.top1 is not None and read.top1[0] == pytest.approx(np.e / (np.e + 1))


@pytest.mark.parametrize(
    ("semantics", "outputs", "why"),
    [
        (OutputSemantics(kind="classifier", scores_output="p"), {"q": np.zeros((2, 3))}, "no output 'p'"),
        (OutputSemantics(kind="classifier", scores_output="p"), {"p": np.zeros((2, 3, 4))}, "not scores"),
        (OutputSemantics(kind="classifier", label_output="l"), {"l": np.zeros(3, dtype=np.float32)}, "not class ids"),
        (
            OutputSemantics(kind="classifier", label_output="l", scores_output="p"),
            {"l": np.zeros(3, dtype=np.int64), "p": np.zeros((2, 3))},
            "3 class ids but 2 rows",
        ),
        (OutputSemantics(kind="regressor", value_output="v"), {"v": np.zeros((2, 3))}, "not values"),
    ],
)
def test_outputs_that_do_not_fit_their_semantics_are_refused_clearly(
    semantics: OutputSemantics, outputs: dict[str, Any], why: str
) -> None:
    with pytest.raises(OutputsError, match=why):
        predictions(semantics, outputs)


def test_unknown_semantics_read_nothing() -> None:
    got = predictions(OutputSemantics(kind="unknown"), {"x": np.zeros((2, 3))})
    assert (got.classes, got.top1, got.margin, got.values) == (None, None, None, None)


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "classifier"},
        {"kind": "regressor", "scores_output": "p"},
        {"kind": "classifier", "label_output": "l", "scores": "logits"},
    ],
)
def test_inconsistent_declarations_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        OutputSemantics.model_validate(bad)


def test_model_spec_carries_declared_semantics_and_older_specs_still_decode() -> None:
    from protocol import DesiredState

    raw = {
        "name": "digits",
        "version": "1.0",
        "artifact": {"url": "http://x/m.onnx", "sha256": "a" * 64, "size": 1},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
    }
    old = ModelSpec.model_validate(raw)
    assert old.output_semantics is None
    declared = OutputSemantics(kind="classifier", scores_output="p", scores="logits", classes=["cat", "dog"])
    state = DesiredState(device_id="dev-1", generation=1, model=old.model_copy(update={"output_semantics": declared}))
    back = decode(DesiredState, encode(state))
    assert back.model is not None and back.model.output_semantics == declared
