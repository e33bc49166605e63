"""The Flower App's parts that need no Flower: the run config, the sample store reader and its split, the round
bookkeeping and the result files (the app itself runs on a real deployment in test_flowerapp.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from federated.flowerapp.edgefleet_fl.results import ResultDir
from federated.flowerapp.edgefleet_fl.rounds import Answer, RoundBook, RoundFailedError, reason_text
from federated.flowerapp.edgefleet_fl.settings import RunSettings, SettingsError
from federated.flowerapp.edgefleet_fl.store import SampleStoreError, count_labelled, held_out, read_labelled, split
from tests.federated.flower import write_store

CONFIG: dict[str, Any] = {
    "model": "digits:1.0",
    "node-ids": "11, 22,33",
    "num-server-rounds": 3,
    "strategy": "fedavg",
    "proximal-mu": 0.0,
    "local-epochs": 1,
    "lr": 0.01,
    "batch-size": 32,
    "optimizer": "sgd",
    "min-nodes": 2,
    "round-timeout": 60.0,
    "dp-noise": 0.0,
    "dp-clip": 0.0,
    "secagg": False,
    "min-samples": 10,
    "eval-fraction": 0.2,
    "result-dir": "/tmp/result",
}


def test_run_config_is_read_with_coercions() -> None:
    settings = RunSettings.from_config(CONFIG | {"lr": 1, "secagg": "true", "num-server-rounds": 2.0})
    assert settings.model == "digits"  # NAME:VERSION → the samples of every version of NAME
    assert settings.node_ids == (11, 22, 33) and settings.rounds == 2 and settings.secagg and settings.lr == 1.0
    assert not settings.dp
    settings.check_server()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"node-ids": "11,x"}, "node-ids: 'x' is not a node id"),
        ({"strategy": "fedsgd"}, "strategy must be one of fedavg, fedprox"),
        ({"eval-fraction": 1.0}, "eval-fraction is the share of each node's labelled samples held out"),
        ({"dp-noise": 0.5}, "dp-clip must be above 0 with dp-noise 0.5"),
        ({"local-epochs": 1.5}, "local-epochs must be a whole number"),
        ({"lr": "fast"}, "lr must be a number"),
        ({"model": ""}, "model is empty"),
    ],
)
def test_run_config_refusals_name_the_key(change: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        RunSettings.from_config(CONFIG | change)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"node-ids": ""}, "node-ids is empty"),
        ({"min-nodes": 4}, "min-nodes 4 is more than the 3 nodes in node-ids"),
        ({"result-dir": "relative"}, "result-dir must be an absolute directory"),
        ({"secagg": True, "dp-noise": 0.1, "dp-clip": 1.0}, "cannot be combined"),
    ],
)
def test_server_refuses_what_it_cannot_run(change: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        RunSettings.from_config(CONFIG | change).check_server()


def test_store_reader_takes_labelled_rows_of_the_model_in_the_programs_shape(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    store = write_store(tmp_path / "s.sqlite3", "digits", rng.random((30, 1, 8, 8), dtype=np.float32), None, prefix="u")
    write_store(store, "digits", rng.random((20, 1, 8, 8), dtype=np.float32), np.arange(20) % 10, prefix="l")
    write_store(store, "digits", rng.random((5, 64), dtype=np.float32), np.arange(5), prefix="flat")
    write_store(store, "other", rng.random((7, 1, 8, 8), dtype=np.float32), np.arange(7), prefix="o")
    assert count_labelled(store, "digits") == 25
    samples = read_labelled(store, "digits", (1, 8, 8))
    assert (len(samples), samples.skipped) == (20, 5)
    assert samples.x.shape == (20, 1, 8, 8) and list(samples.y) == list(np.arange(20) % 10)
    assert samples.keys[:5] == (("l-0", 0), ("l-0", 1), ("l-0", 2), ("l-0", 3), ("l-1", 0))
    train, held = split(samples, 0.3)
    assert len(train) + len(held) == 20 and set(train.keys).isdisjoint(held.keys)
    assert split(samples, 0.3)[1].keys == held.keys  # the same rows every time


def test_held_out_share_follows_eval_fraction() -> None:
    draws = [held_out(f"r{i}", i % 4, 0.2) for i in range(4000)]
    assert 0.17 < sum(draws) / len(draws) < 0.23


def test_store_refusals_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(SampleStoreError, match="does not exist"):
        count_labelled(tmp_path / "absent.sqlite3", "digits")
    store = write_store(tmp_path / "s.sqlite3", "digits", np.zeros((2, 3), np.float32), np.array([1, 2]), prefix="r")
    import sqlite3

    with sqlite3.connect(store) as db:
        db.execute("UPDATE samples SET label = '0.5' WHERE row = 1")
    with pytest.raises(SampleStoreError, match="this app trains classifiers"):
        read_labelled(store, "digits", (3,))
    with sqlite3.connect(store) as db:
        db.execute("PRAGMA user_version = 2")
    with pytest.raises(SampleStoreError, match="has format 2; this app reads 1"):
        count_labelled(store, "digits")


def test_round_book_records_each_phase_and_fails_below_min_nodes(tmp_path: Path) -> None:
    book = RoundBook(ResultDir(tmp_path), min_nodes=2, timeout=30)
    book.sent(1, "train", [11, 22, 33])
    answers = [
        Answer("11", metrics={"train_loss": 0.5, "num-examples": 100}),
        Answer("22", metrics={"train_loss": 0.7, "num-examples": 50}),
        Answer("33", error=reason_text("<class 'edgefleet_fl.store.SampleStoreError'>:<'dev-3 has 2 samples'>")),
    ]
    book.require(1, "train", answers)
    book.record(1, "train", answers, {"train_loss": 0.567})
    (line,) = [json.loads(x) for x in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert (line["round"], line["phase"], line["replies"], line["failures"]) == (1, "train", 2, 1)
    assert line["nodes"] == ["11", "22"] and line["metrics"] == {"train_loss": 0.567, "num-examples": 150}
    assert line["errors"] == {"33": "SampleStoreError: dev-3 has 2 samples"}
    book.sent(1, "evaluate", [11, 22, 33])
    with pytest.raises(RoundFailedError) as failed:
        book.require(1, "evaluate", [Answer("11", metrics={"num-examples": 10})])
    assert str(failed.value) == (
        "only 1 of the 2 required nodes answered in round 1 (evaluate): node 22 did not answer within 30 s; "
        "node 33 did not answer within 30 s"
    )
    assert len((tmp_path / "progress.jsonl").read_text().splitlines()) == 2  # the failed phase is recorded too


def test_results_are_written_atomically(tmp_path: Path) -> None:
    results = ResultDir(tmp_path / "r")
    results.final({"w": np.ones((2, 2), np.float32)})
    results.summary({"rounds": 1})
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["final.npz", "summary.json"]
    with np.load(tmp_path / "r" / "final.npz") as data:
        assert data["w"].dtype == np.float32 and data["w"].sum() == 4
