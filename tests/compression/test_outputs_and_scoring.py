"""Pure decisions of a compress run on any model: which output is judged, how, what exit status; data readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from compression.baseline import self_contained_copy
from compression.cli import EXIT_CONVERTER, EXIT_REFUSED, exit_code
from compression.data import fixed_batches, load_dataset
from compression.errors import InvalidInputError
from compression.outputs import EvaluatedOutput, OutputKind, choose_output
from compression.pipeline import CompressionResult, SkippedVariant
from compression.reference import mlp_to_onnx
from compression.scoring import CompressionReport, GateVerdict, Measurement, gate, score
from protocol.messages import Datatype, TensorSpec

LABEL = TensorSpec(name="label", datatype=Datatype.INT64, shape=[-1])
PROBABILITIES = TensorSpec(name="probabilities", datatype=Datatype.FP32, shape=[-1, 10])
VALUE = TensorSpec(name="variable", datatype=Datatype.FP32, shape=[-1, 1])


def test_skl2onnx_classifier_is_judged_on_its_probabilities_and_its_label_output_as_class_ids() -> None:
    assert choose_output([LABEL, PROBABILITIES]) == EvaluatedOutput("probabilities", OutputKind.SCORES)
    assert choose_output([LABEL, PROBABILITIES], requested="label") == EvaluatedOutput("label", OutputKind.LABELS)
    assert choose_output([LABEL]) == EvaluatedOutput("label", OutputKind.LABELS)


def test_a_single_value_output_is_a_regressor_and_any_output_can_be_compared_as_values() -> None:
    assert choose_output([VALUE]).task == "regression"
    assert choose_output([PROBABILITIES], task="regression").kind is OutputKind.VALUES
    assert choose_output([LABEL, PROBABILITIES], requested="label", task="regression").kind is OutputKind.VALUES


@pytest.mark.parametrize(
    ("outputs", "options", "message"),
    [
        ([PROBABILITIES, PROBABILITIES.model_copy(update={"name": "logits"})], {}, "choose one with --output"),
        ([LABEL, PROBABILITIES], {"requested": "scores"}, "no such output (it has ['label', 'probabilities'])"),
        ([VALUE], {"task": "classification"}, "looks like class scores"),
        ([TensorSpec(name="map", datatype=Datatype.FP32, shape=[-1, 3, 8, 8])], {}, "--task regression"),
        ([LABEL], {"task": "ranking"}, "--task 'ranking'"),
    ],
)
def test_an_output_that_cannot_be_judged_is_refused_with_what_to_pass(
    outputs: list[TensorSpec], options: dict[str, str], message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        choose_output(outputs, **options)


def _m(name: str, *, accuracy: float | None = None, agreement: float | None = None, **errors: float) -> Measurement:
    return Measurement(name, 1000, accuracy, agreement, 0.1, 0.2, 10, None, None, **errors)


def test_regressor_gate_compares_rmse_with_fp32s_and_without_targets_the_deviation() -> None:
    base = _m("fp32", rmse=1.0, mae=0.8, deviation_pct=0.0)
    report = CompressionReport(base, (_m("a", rmse=1.009, deviation_pct=3.0), _m("b", rmse=1.02, deviation_pct=0.5)))
    verdicts = gate(report, max_drop_pp=1.0)
    assert [(v.accepted, v.metric) for v in verdicts] == [(True, "rmse"), (False, "rmse")]
    assert "RMSE 1.02 is 2.00 % above fp32's (1), more than the allowed 1 %" in verdicts[1].reason
    no_targets = CompressionReport(
        _m("fp32", deviation_pct=0.0), (_m("a", deviation_pct=0.9), _m("b", deviation_pct=2))
    )
    assert [(v.accepted, v.metric) for v in gate(no_targets)] == [(True, "deviation"), (False, "deviation")]


def test_classifier_without_labels_is_gated_on_agreement_with_fp32() -> None:
    report = CompressionReport(_m("fp32", agreement=1.0), (_m("a", agreement=0.995), _m("b", agreement=0.98)))
    verdicts = gate(report, max_drop_pp=1.0)
    assert [(v.accepted, v.metric) for v in verdicts] == [(True, "agreement"), (False, "agreement")]
    assert verdicts[1].drop_pp == pytest.approx(2.0)


def test_scores_of_a_regressor_and_labels_that_are_not_class_ids() -> None:
    values = EvaluatedOutput("variable", OutputKind.VALUES)
    reference = np.array([[0.0], [2.0], [4.0]])
    scores = score(values, reference + 0.5, reference, np.array([0.0, 2.0, 5.0]))
    assert scores.mae == pytest.approx(0.5) and scores.rmse == pytest.approx(0.5)  # errors 0.5, 0.5, -0.5
    assert scores.deviation_pct == pytest.approx(0.5 / np.std(reference) * 100)
    classes = EvaluatedOutput("probabilities", OutputKind.SCORES)
    with pytest.raises(InvalidInputError, match="--task regression"):
        score(classes, np.array([1, 2]), np.array([1, 2]), np.array([1.5, 2.0], dtype=np.float32))


def _result(*, refused: bool = False, skipped: bool = False) -> CompressionResult:
    base = _m("fp32", accuracy=0.9, agreement=1.0)
    verdicts = [GateVerdict("int8-static", not refused, 2.0 if refused else 0.0, "why")]
    return CompressionResult(
        variants=[],
        report=CompressionReport(base, ()),
        verdicts=verdicts,
        document={},
        manifest_path=Path("variants.json"),
        skipped=[SkippedVariant("tflite-int8", "no .pt2")] if skipped else [],
    )


def test_exit_status_fails_only_when_a_named_variant_is_missing_or_a_variant_is_refused() -> None:
    assert exit_code(_result(skipped=True), explicit=False) == 0  # the default set: what this model can give
    assert exit_code(_result(skipped=True), explicit=True) == EXIT_CONVERTER
    assert exit_code(_result(refused=True), explicit=False) == EXIT_REFUSED
    assert exit_code(_result(), explicit=True) == 0


def test_csv_without_a_label_column_or_header_is_inputs_only_and_float_targets_stay_float(tmp_path: Path) -> None:
    (tmp_path / "plain.csv").write_text("0.1,0.2\n0.3,0.4\n")
    (tmp_path / "named.csv").write_text("a,b\n0.1,0.2\n\n0.3,0.4\n")
    (tmp_path / "target.csv").write_text("a,Target\n0.1,1.5\n0.3,2.0\n")
    plain, named, target = (load_dataset(tmp_path / f"{n}.csv") for n in ("plain", "named", "target"))
    assert plain.y is None and named.y is None and plain.x.shape == named.x.shape == (2, 2)
    assert target.x.shape == (2, 1) and target.y is not None and target.y.dtype == np.float32
    np.savez(tmp_path / "classes.npz", x=np.zeros((2, 3)), y=np.array([1.0, 2.0]))
    labels = load_dataset(tmp_path / "classes.npz").y
    assert labels is not None and labels.dtype == np.int64  # whole numbers are class ids
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(InvalidInputError, match=r"not a readable \.npy file"):
        load_dataset(tmp_path / "objects.npy")


def test_fixed_batches_pad_the_last_chunk_and_say_how_many_rows_are_real() -> None:
    chunks = list(fixed_batches(np.arange(5).reshape(5, 1), 2))
    assert [rows for _, rows in chunks] == [2, 2, 1]
    assert chunks[-1][0].ravel().tolist() == [4, 4]


def test_baseline_with_missing_external_data_names_the_file(tmp_path: Path) -> None:
    weights = [np.ones((4, 3), np.float32)]
    model = mlp_to_onnx(weights, [np.zeros(3, np.float32)])
    onnx.save_model(
        model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0
    )
    copy = self_contained_copy(tmp_path / "m.onnx", tmp_path / "out" / "fp32.onnx")
    assert not onnx.load(str(copy), load_external_data=False).graph.initializer[0].external_data
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(InvalidInputError, match=r"keeps its weights in m\.onnx\.data"):
        self_contained_copy(tmp_path / "m.onnx", tmp_path / "out2" / "fp32.onnx")
