"""The Flower App (federated/flowerapp) on Flower's real deployment engine: one SuperLink, four SuperNodes.

Three devices hold labelled samples in their stores (contract §6), non-IID: `clinic-a` mostly digits 0-4,
`clinic-b` mostly 5-9, and `drifted` a cohort whose camera got noisy (every training digit with Gaussian noise
of standard deviation 0.5, `simulators.drift`). A fourth SuperNode, `outsider`, is connected but not in any
run's `node-ids`; its sample store does not even exist, so a single message to it would come back as a failure.
The parent is the reference CNN. Each run takes ~20 s per round here (a fresh ClientApp process per message).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.federated.flower import FlowerCluster, flower_cluster, make_run_dir, require_flower, write_store
from tests.services import require_convert_extra

require_convert_extra(module_level=True)

from compression.cnn import INPUT_SHAPE, build_reference_cnn  # noqa: E402  (after the check that torch is there)
from compression.reference import load_digits_split  # noqa: E402
from compression.trainable import load_state_npz, load_trainable  # noqa: E402
from simulators.drift import Drift  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

MODEL = "digits"
NOISE = Drift("noise", 0.5)
# What retraining must achieve on held-out digits the devices never saw (measured: drifted 0.40 → ~0.6 after
# 3 rounds, clean 0.99 → ~0.97 in a simulation with the same data and settings).
MIN_DRIFTED_GAIN = 0.10  # accuracy points gained on noisy held-out digits
MAX_CLEAN_DROP = 0.05  # accuracy points lost at most on clean held-out digits
BASE_CONFIG: dict[str, Any] = {
    "model": MODEL,
    "num-server-rounds": 2,
    "strategy": "fedavg",
    "proximal-mu": 0.01,
    "local-epochs": 3,
    "lr": 0.01,
    "batch-size": 32,
    "optimizer": "sgd",
    "min-nodes": 3,
    "round-timeout": 120.0,
    "dp-noise": 0.0,
    "dp-clip": 1.0,
    "secagg": False,
    "min-samples": 20,
    "eval-fraction": 0.2,
}


@dataclass
class World:
    """The deployment, the parent model and the held-out data the retrained model is judged on."""

    cluster: FlowerCluster
    workdir: Path
    parent: Path  # the parent's trainable form
    cohort: list[int]  # node ids of the three devices with samples
    outsider: int
    clean: tuple[np.ndarray, np.ndarray]
    drifted: tuple[np.ndarray, np.ndarray]

    def run(self, name: str, **overrides: Any) -> tuple[str, str, Path]:
        """Start a run with BASE_CONFIG and `overrides` (`node_ids` as a list); (status, details, result dir)."""
        app = make_run_dir(self.workdir / name / "app", self.parent.read_bytes())
        result_dir = self.workdir / name / "result"
        nodes = overrides.pop("node_ids", self.cohort)
        config = {
            **BASE_CONFIG,
            **{k.replace("_", "-"): v for k, v in overrides.items()},
            "node-ids": ",".join(str(n) for n in nodes),
            "result-dir": str(result_dir),
        }
        status, details = self.cluster.wait(self.cluster.run(app, config))
        return status, details, result_dir

    def accuracy(self, final: Path | None, data: tuple[np.ndarray, np.ndarray]) -> float:
        """Accuracy of the parent (`final` None) or of the parent with the weights in `final`."""
        import torch

        module = load_trainable(self.parent)
        if final is not None:
            load_state_npz(module, final)
        with torch.no_grad():
            logits = module(torch.from_numpy(data[0]))
        return float((logits.argmax(1).numpy() == data[1]).mean())


def _images(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(-1, *INPUT_SHAPE), dtype=np.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require_flower()
    work = tmp_path_factory.mktemp("federated")
    parent = build_reference_cnn(work / "parent").trainable_path
    split = load_digits_split()
    rng = np.random.default_rng(7)
    mostly_low = (split.y_train < 5) ^ (rng.random(len(split.y_train)) < 0.2)
    noisy_train = NOISE.apply(split.x_train, np.random.default_rng(1))
    stores = {
        "clinic-a": write_store(
            work / "a.sqlite3", MODEL, _images(split.x_train[mostly_low]), split.y_train[mostly_low], prefix="a"
        ),
        "clinic-b": write_store(
            work / "b.sqlite3", MODEL, _images(split.x_train[~mostly_low]), split.y_train[~mostly_low], prefix="b"
        ),
        "drifted": write_store(work / "c.sqlite3", MODEL, _images(noisy_train), split.y_train, prefix="c"),
    }
    with flower_cluster(work / "flower") as cluster:
        cohort = [
            cluster.start_supernode(name, {"sample-store": str(path), "device-id": name})
            for name, path in stores.items()
        ]
        outsider = cluster.start_supernode(
            "outsider", {"sample-store": str(work / "outsider" / "absent.sqlite3"), "device-id": "outsider"}
        )
        yield World(
            cluster=cluster,
            workdir=work,
            parent=parent,
            cohort=cohort,
            outsider=outsider,
            clean=(_images(split.x_test), split.y_test),
            drifted=(_images(NOISE.apply(split.x_test, np.random.default_rng(2))), split.y_test),
        )


def _progress(result_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (result_dir / "progress.jsonl").read_text().splitlines()]


def _assert_every_round_from_the_cohort(world: World, result_dir: Path, rounds: int) -> list[dict[str, Any]]:
    lines = _progress(result_dir)
    assert [(line["round"], line["phase"]) for line in lines] == [
        (r, phase) for r in range(1, rounds + 1) for phase in ("train", "evaluate")
    ]
    cohort = sorted(str(n) for n in world.cohort)
    for line in lines:
        assert (line["replies"], line["failures"], line["nodes"]) == (3, 0, cohort), line
        assert str(world.outsider) not in line["nodes"] + line["missing"] + list(line["errors"])
    return lines


def test_fedavg_retrains_the_drifted_cohort_and_never_messages_another_node(world: World) -> None:
    status, details, result_dir = world.run("fedavg", num_server_rounds=3)
    assert status == "finished:completed", details
    lines = _assert_every_round_from_the_cohort(world, result_dir, 3)
    assert all({"train_loss", "num-examples"} <= line["metrics"].keys() for line in lines if line["phase"] == "train")
    assert all({"eval_loss", "eval_acc"} <= line["metrics"].keys() for line in lines if line["phase"] == "evaluate")
    summary = json.loads((result_dir / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["nodes"] == sorted(str(n) for n in world.cohort)
    assert set(summary["train"]) == set(summary["evaluate"]) == {"1", "2", "3"}
    assert summary["dp"] is None and summary["epsilon"] is None

    final = result_dir / "final.npz"
    parent_drifted, parent_clean = world.accuracy(None, world.drifted), world.accuracy(None, world.clean)
    new_drifted, new_clean = world.accuracy(final, world.drifted), world.accuracy(final, world.clean)
    print(f"accuracy drifted {parent_drifted:.3f} -> {new_drifted:.3f}, clean {parent_clean:.3f} -> {new_clean:.3f}")
    assert new_drifted >= parent_drifted + MIN_DRIFTED_GAIN
    assert new_clean >= parent_clean - MAX_CLEAN_DROP


def test_fedprox_run_completes(world: World) -> None:
    status, details, result_dir = world.run("fedprox", strategy="fedprox", proximal_mu=0.1)
    assert status == "finished:completed", details
    _assert_every_round_from_the_cohort(world, result_dir, 2)
    summary = json.loads((result_dir / "summary.json").read_text())
    assert (summary["strategy"], summary["proximal_mu"]) == ("fedprox", 0.1)
    assert world.accuracy(result_dir / "final.npz", world.drifted) > world.accuracy(None, world.drifted)


def test_dp_run_completes_with_noise_on_the_aggregate(world: World) -> None:
    status, details, result_dir = world.run("dp", dp_noise=0.1, dp_clip=1.0)
    assert status == "finished:completed", details
    _assert_every_round_from_the_cohort(world, result_dir, 2)
    dp = json.loads((result_dir / "summary.json").read_text())["dp"]
    assert (dp["noise_multiplier"], dp["clipping_norm"], dp["sampled_nodes_per_round"]) == (0.1, 1.0, 3)
    assert dp["noise_stdev"] == pytest.approx(0.1 * 1.0 / 3)
    # The Makefile's Flower venv has flwr[dp] (dp-accounting), so Flower's RDP accountant gives the run's epsilon.
    assert dp["epsilon"] > 0 and dp["delta"] == 1e-5 and "RdpAccountant" in dp["accountant"], dp
    # Noise of stdev 0.033 on every weight of a small CNN costs accuracy; the bound only says it still learned.
    assert world.accuracy(result_dir / "final.npz", world.clean) > 0.5


def test_secagg_run_completes(world: World) -> None:
    status, details, result_dir = world.run("secagg", secagg=True)
    assert status == "finished:completed", details
    _assert_every_round_from_the_cohort(world, result_dir, 2)
    assert json.loads((result_dir / "summary.json").read_text())["secagg"] is True
    assert world.accuracy(result_dir / "final.npz", world.drifted) > world.accuracy(None, world.drifted)


def test_run_fails_when_fewer_allowed_nodes_than_min_nodes_are_connected(world: World) -> None:
    offline = 4242  # a node id no SuperNode has
    status, details, result_dir = world.run(
        "too-few", node_ids=[*world.cohort, offline], min_nodes=4, round_timeout=5.0
    )
    assert status == "finished:failed"
    assert "only 3 of the 4 required nodes are connected for round 1 (train) after waiting 5 s" in details
    assert not (result_dir / "final.npz").exists()


def test_run_fails_naming_the_node_whose_clientapp_failed(world: World) -> None:
    status, details, result_dir = world.run("outsider-in", node_ids=[*world.cohort, world.outsider], min_nodes=4)
    assert status == "finished:failed"
    assert "only 3 of the 4 required nodes answered in round 1 (train)" in details
    assert f"node {world.outsider}: SampleStoreError: sample store" in details and "does not exist" in details
    (line,) = _progress(result_dir)
    assert (line["replies"], line["failures"], list(line["errors"])) == (3, 1, [str(world.outsider)])
