"""The candidate builder: its pure decisions (name, variants, evaluation data, card, canary plan), a real build of
a candidate from a run's `final.npz` through the compression package and its accuracy gate, and the whole
hand-off against a recording client (the registry end to end is the coordinator's federated test)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.services import require_convert_extra

require_convert_extra(module_level=True)

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from cloud.client import ApiError  # noqa: E402
from cloud.models import ModelCard  # noqa: E402
from cloud.rollouts.plan import RolloutPlan  # noqa: E402
from cloud.services.cards import parse_card  # noqa: E402
from cloud.services.registry import lineage  # noqa: E402
from compression.cnn import INPUT_NAME, INPUT_SHAPE, OUTPUT_NAME, build_reference_cnn  # noqa: E402
from compression.reference import load_digits_split  # noqa: E402
from compression.trainable import load_state_npz, load_trainable, state_dict_npz  # noqa: E402
from federated import candidate  # noqa: E402
from federated.build import build_candidate  # noqa: E402
from federated.lineage import (  # noqa: E402
    canary_plan,
    candidate_card,
    candidate_version,
    choose_eval,
    federated_record,
    variants_to_build,
)
from protocol.manifest import read_manifest  # noqa: E402

SUMMARY: dict[str, Any] = {
    "rounds": 2,
    "nodes": ["11", "22", "33"],
    "train": {"1": {"train_loss": 0.7, "num-examples": 2160, "time-load-s": 5.0}, "2": {"train_loss": 0.6}},
    "evaluate": {"1": {"eval_acc": 0.73, "eval_loss": 0.9}, "2": {"eval_acc": 0.75, "eval_loss": 0.8}},
    "strategy": "fedavg",
    "secagg": False,
    "dp": None,
    "epsilon": None,
}
RUN: dict[str, Any] = {
    "id": 7,
    "model_name": "digits",
    "parent_version": "1.0",
    "selector": {"site": "lab"},
    "params": {"rounds": 2, "strategy": "fedavg", "local_epochs": 3, "lr": 0.01, "min_nodes": 3, "secagg": False},
    "devices": ["dev-a", "dev-b", "dev-c"],
    "node_ids": ["11", "22", "33"],
    "flower_run_id": "99",
    "created_by": "operator-token",
}


# -- pure decisions ------------------------------------------------------------------------------------------


def test_candidate_is_named_after_parent_and_run_and_takes_the_next_free_name() -> None:
    assert candidate_version("1.0", 7, set()) == "1.0-fl.7"
    assert candidate_version("1.0", 7, {"1.0-fl.7"}) == "1.0-fl.7.2"
    assert candidate_version("1.0", 7, {"1.0-fl.7", "1.0-fl.7.2"}) == "1.0-fl.7.3"
    with pytest.raises(ValueError, match="not a valid version"):
        candidate_version("v" * 60, 12345, set())


def test_candidate_gets_the_parents_variants_that_compression_can_build() -> None:
    parent = {"primary_variant": "fp32", "variants": [{"name": "tflite-int8"}, {"name": "int8-static"}, {"name": "x"}]}
    assert variants_to_build(parent) == ["int8-static", "tflite-int8"]
    assert variants_to_build({"primary_variant": "default", "variants": []}) == []


@pytest.mark.parametrize(
    ("params", "shape", "expected"),
    [
        ({"eval_data": "/data/held-out.npz"}, (3, 32, 32), ("/data/held-out.npz", "/data/held-out.npz")),
        ({}, (1, 8, 8), ("digits", "digits-train")),
        ({"eval_data": None}, (64,), ("digits", "digits-train")),
        ({}, (3, 32, 32), (None, None)),
    ],
)
def test_evaluation_data_is_the_runs_else_digits_for_digit_shapes_else_none(
    params: dict[str, Any], shape: tuple[int, ...], expected: tuple[str | None, str | None]
) -> None:
    choice = choose_eval(params, shape)
    assert (choice.evaluation, choice.calibration) == expected
    if expected[0] is None:
        assert "only fp32" in choice.note


def test_card_carries_lineage_the_parents_risk_and_the_run_and_passes_the_registry_schema() -> None:
    parent_card = {
        "intended_use": "Reading handwritten digits on forms.",
        "training_data": "sklearn digits",
        "limitations": "8x8 grey images only.",
        "risk_class": "high",
        "owner": "vision team",
    }
    record = federated_record(RUN, SUMMARY)
    card = candidate_card(
        model="digits",
        parent_version="1.0",
        run_id=7,
        parent_card=parent_card,
        federated=record,
        metrics={"accuracy": 0.95, "federated_eval_acc": 0.75},
        risk_class="high",
        owner="operator-token",
    )
    parsed = parse_card(card)  # the registry's own schema
    assert (parsed.risk_class, parsed.owner) == ("high", "vision team")
    assert parsed.intended_use == parent_card["intended_use"]
    assert parsed.limitations.startswith("8x8 grey images only. Retrained from digits:1.0 by federated run fl-7")
    stored = ModelCard(model_version_id=1, card=parsed.model_dump(mode="json"), sha256="0" * 64)
    assert (lineage(stored).parent_version, lineage(stored).run) == ("1.0", "fl-7")
    federated = parsed.extra["federated"]
    assert (federated["rounds"], federated["strategy"], federated["devices"]) == (2, "fedavg", RUN["devices"])
    assert federated["evaluate"] == {"1": SUMMARY["evaluate"]["1"], "2": SUMMARY["evaluate"]["2"]}
    assert federated["train"]["1"] == {"train_loss": 0.7, "num-examples": 2160.0}  # timings left out
    assert (federated["dp"], federated["secagg"], federated["flower_run_id"]) == (None, False, "99")
    assert parsed.training_data["parent_training_data"] == "sklearn digits"  # type: ignore[index]


def test_card_of_a_parent_without_card_is_low_risk_with_generic_texts() -> None:
    card = candidate_card(
        model="digits",
        parent_version="1.0",
        run_id=3,
        parent_card=None,
        federated=federated_record(RUN, SUMMARY),
        metrics={},
        risk_class="low",
    )
    parsed = parse_card(card)
    assert parsed.risk_class == "low" and "digits:1.0" in parsed.intended_use
    assert parsed.owner == "edgefleet federated retraining"


def test_canary_plan_is_a_valid_rollout_with_the_parent_as_control() -> None:
    plan = RolloutPlan.model_validate(
        canary_plan(model="digits", version="1.0-fl.7", parent_version="1.0", selector={"site": "lab"})
    )
    assert (plan.version, plan.previous_version, plan.baseline) == ("1.0-fl.7", "1.0", "control")
    assert plan.selector.tags == {"site": "lab"}
    # Retraining is meant to change predictions: no prediction-shift gate; a failed gate goes back to the parent.
    assert plan.gates.max_psi is None and plan.gates.max_error_rate_increase is not None
    assert plan.on_gate_failure == "rollback"


def test_canary_plan_takes_the_runs_overrides_but_not_its_target() -> None:
    overrides = {
        "waves": [{"count": 1, "bake_seconds": 5}, {"percent": 100, "bake_seconds": 5}],
        "gates": {"min_inferences": 20},
        "version": "9.9",
        "selector": {"tags": {}},
    }
    plan = RolloutPlan.model_validate(
        canary_plan(
            model="digits", version="1.0-fl.7", parent_version="1.0", selector={"site": "lab"}, overrides=overrides
        )
    )
    assert plan.version == "1.0-fl.7" and plan.selector.tags == {"site": "lab"}
    assert [w.bake_seconds for w in plan.waves] == [5, 5]
    assert plan.gates.min_inferences == 20 and plan.gates.max_psi is None


# -- a real build ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The parent's trainable form: the reference CNN (a short training is enough here)."""
    return build_reference_cnn(tmp_path_factory.mktemp("parent"), epochs=10).trainable_path


@pytest.fixture(scope="module")
def final_npz(parent: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a run leaves: the parent's weights after some training on noisy digits."""
    module = load_trainable(parent)
    split = load_digits_split()
    x = torch.from_numpy(np.clip(split.x_train + np.random.default_rng(0).normal(0, 0.3, split.x_train.shape), 0, 1))
    x, y = x.float().reshape(-1, *INPUT_SHAPE), torch.from_numpy(split.y_train)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    for start in range(0, len(x), 32):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module(x[start : start + 32]), y[start : start + 32]).backward()
        optimizer.step()
    return state_dict_npz(module, tmp_path_factory.mktemp("result") / "final.npz")


def test_candidate_is_built_into_the_parents_variants_through_the_gate(
    parent: Path, final_npz: Path, tmp_path: Path
) -> None:
    built = build_candidate(
        parent_trainable=parent,
        final_npz=final_npz,
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        variants=["int8-static", "int8-dynamic"],
        evaluation="digits",
        calibration="digits-train",
        out_dir=tmp_path / "variants",
        work_dir=tmp_path / "source",
        max_drop_pp=2.0,
        latency_iterations=5,
        measure_memory=False,
    )
    manifest = read_manifest(tmp_path / "variants")  # what the push reads
    accepted = {v.name for v in manifest.variants}
    assert accepted | {r.name for r in manifest.refused} == {"fp32", "int8-static", "int8-dynamic"}
    assert "fp32" in accepted and accepted & {"int8-static", "int8-dynamic"}, manifest.refused
    assert all(v.accuracy is not None and v.accuracy > 0.8 for v in manifest.variants)
    assert {r.name for r in manifest.refused} == {v.name for v in built.result.refused}
    # The fp32 variant and the trainable form are the parent with the run's weights, named like the parent.
    expected = load_state_npz(load_trainable(parent), final_npz)
    x = load_digits_split().x_test[:40].reshape(-1, *INPUT_SHAPE)
    session = ort.InferenceSession(str(tmp_path / "variants" / "fp32.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
    trainable = load_trainable(tmp_path / "variants" / "trainable.pt2")
    with torch.no_grad():
        np.testing.assert_allclose(logits, expected(torch.from_numpy(x)).numpy(), atol=1e-4)
        np.testing.assert_allclose(trainable(torch.from_numpy(x)).numpy(), logits, atol=1e-4)


# -- the hand-off, against a recording client ----------------------------------------------------------------


@dataclass
class RecordingClient:
    """Answers like the coordinator for one run and records what the builder sends."""

    parent_trainable: bytes
    result_dir: Path
    params: dict[str, Any]
    risk: str = "low"
    refuse_push: bool = False
    versions: list[dict[str, Any]] = field(default_factory=lambda: [{"version": "1.0"}, {"version": "1.0-fl.7"}])
    calls: list[tuple[str, Any]] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)

    def federated_run(self, run_id: int) -> dict[str, Any]:
        return RUN | {"id": run_id, "params": RUN["params"] | self.params | {"result_dir": str(self.result_dir)}}

    def report_federated_candidate(self, run_id: int, body: dict[str, Any]) -> dict[str, Any]:
        self.reports.append(body)
        return {"id": run_id}

    def model(self, name: str) -> dict[str, Any]:
        return {"name": name, "versions": self.versions}

    def model_version(self, name: str, version: str) -> dict[str, Any]:
        return {
            "name": name,
            "version": version,
            "risk_class": self.risk,
            "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *INPUT_SHAPE]}],
            "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, 10]}],
            "primary_variant": "fp32",
            "variants": [{"name": "int8-dynamic"}],
            "compression_report": {"max_drop_pp": 2.0},
        }

    def model_card(self, name: str, version: str) -> dict[str, Any]:
        raise ApiError("no card (HTTP 404)", status=404)

    def set_model_card(self, name: str, version: str, card: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("card", (version, card)))
        return {"card": card}

    def trainable(self, name: str, version: str) -> bytes:
        return self.parent_trainable

    def push_trainable(self, name: str, version: str, path: Path) -> dict[str, Any]:
        self.calls.append(("trainable", (version, path.read_bytes())))
        return {}

    def push_variants(
        self, directory: Path, *, name: str, version: str, risk_class: str | None = None
    ) -> dict[str, Any]:
        if self.refuse_push:
            raise ApiError("version exists (HTTP 409)", status=409)
        names = sorted(v.name for v in read_manifest(directory).variants)
        self.calls.append(("variants", (version, risk_class, names)))
        return {}

    def create_rollout(self, plan: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("rollout", plan))
        return {"id": 5}

    def rollouts(self) -> list[dict[str, Any]]:
        return []


@pytest.fixture
def result_dir(final_npz: Path, tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "result"
    directory.mkdir()
    (directory / "final.npz").write_bytes(final_npz.read_bytes())
    (directory / "summary.json").write_text(json.dumps(SUMMARY))
    yield directory


def _main(client: RecordingClient, tmp_path: Path) -> int:
    return candidate.main(["7", "--work-dir", str(tmp_path / "work")], client=client)


def test_builder_pushes_the_candidate_with_card_and_trainable_then_a_canary(
    parent: Path, result_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = RecordingClient(parent.read_bytes(), result_dir, {"rollout": "canary", "max_accuracy_drop": 0.2})
    assert _main(client, tmp_path) == 0
    assert client.reports == [{"candidate_version": "1.0-fl.7.2", "rollout_id": 5, "error": None}]
    calls = dict(client.calls)
    assert calls["variants"] == ("1.0-fl.7.2", "low", ["fp32", "int8-dynamic"])
    version, card = calls["card"]
    assert (version, card["parent_version"], card["run"], card["risk_class"]) == ("1.0-fl.7.2", "1.0", "fl-7", "low")
    assert {"accuracy", "parent_accuracy", "federated_eval_acc"} <= card["metrics"].keys()
    assert calls["trainable"][1][:2] == b"PK"  # the candidate's own .pt2 archive
    assert calls["rollout"]["previous_version"] == "1.0" and calls["rollout"]["selector"] == {"tags": {"site": "lab"}}
    assert "candidate of run 7: candidate digits:1.0-fl.7.2 registered" in capsys.readouterr().err


def test_high_risk_candidate_waits_for_approvers_instead_of_a_canary(
    parent: Path, result_dir: Path, tmp_path: Path
) -> None:
    client = RecordingClient(
        parent.read_bytes(), result_dir, {"rollout": "canary", "max_accuracy_drop": 0.2}, risk="high"
    )
    assert _main(client, tmp_path) == 0
    assert client.reports == [{"candidate_version": "1.0-fl.7.2", "rollout_id": None, "error": None}]
    assert dict(client.calls)["variants"][1] == "high" and "rollout" not in dict(client.calls)


@pytest.fixture
def ruined_result_dir(parent: Path, tmp_path: Path) -> Path:
    """What a run that went wrong leaves: the parent's weights scrambled (seeded noise of twice their size)."""
    module = load_trainable(parent)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 2 * parameter.abs().mean())
    directory = tmp_path / "ruined"
    directory.mkdir()
    state_dict_npz(module, directory / "final.npz")
    (directory / "summary.json").write_text(json.dumps(SUMMARY))
    return directory


def test_candidate_that_fails_the_accuracy_gate_is_registered_but_not_rolled_out(
    parent: Path, ruined_result_dir: Path, tmp_path: Path
) -> None:
    # Scrambled weights lose far more than 5 points against the parent on the held-out digits. (Weights merely
    # fine-tuned on noisy digits lose 0-7 points depending on the machine's torch arithmetic: no test of a gate.)
    client = RecordingClient(parent.read_bytes(), ruined_result_dir, {"rollout": "canary", "max_accuracy_drop": 0.05})
    assert _main(client, tmp_path) == candidate.EXIT_REPORTED_FAILURE
    (report,) = client.reports
    assert report["candidate_version"] == "1.0-fl.7.2" and report["rollout_id"] is None
    assert "failed the accuracy gate" in report["error"] and "digits:1.0 keeps serving" in report["error"]
    assert "rollout" not in dict(client.calls) and "variants" in dict(client.calls)


def test_builder_started_again_finds_its_candidate_and_only_rolls_it_out(
    parent: Path, result_dir: Path, tmp_path: Path
) -> None:
    pushed = {"version": "1.0-fl.7", "lineage": {"parent_version": "1.0", "run": "fl-7"}}
    client = RecordingClient(
        parent.read_bytes(), result_dir, {"rollout": "canary"}, versions=[{"version": "1.0"}, pushed]
    )
    assert _main(client, tmp_path) == 0
    assert client.reports == [{"candidate_version": "1.0-fl.7", "rollout_id": 5, "error": None}]
    assert [name for name, _ in client.calls] == ["rollout"]


def test_accuracy_gate_needs_both_accuracies() -> None:
    assert candidate.accuracy_gate({"accuracy": 0.80}, 0.05) is None  # no labelled evaluation data: no gate
    assert candidate.accuracy_gate({"accuracy": 0.90, "parent_accuracy": 0.94}, 0.05) is None
    refusal = candidate.accuracy_gate({"accuracy": 0.80, "parent_accuracy": 0.94}, 0.05)
    assert refusal is not None and "0.800" in refusal and "0.940" in refusal


def test_builder_reports_a_refused_push_and_exits_non_zero(parent: Path, result_dir: Path, tmp_path: Path) -> None:
    client = RecordingClient(parent.read_bytes(), result_dir, {}, refuse_push=True)
    assert _main(client, tmp_path) == candidate.EXIT_REPORTED_FAILURE
    assert client.reports == [{"candidate_version": None, "rollout_id": None, "error": "version exists (HTTP 409)"}]


def test_builder_reports_a_run_without_result(parent: Path, tmp_path: Path) -> None:
    client = RecordingClient(parent.read_bytes(), tmp_path / "nothing", {})
    assert _main(client, tmp_path) == candidate.EXIT_REPORTED_FAILURE
    (report,) = client.reports
    assert report["candidate_version"] is None and "left no final.npz" in report["error"]
