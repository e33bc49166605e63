"""`edgefleet federated ...`: against a real coordinator (federated learning off), and in-process against one with a
fake Flower control whose runs the test moves along (the real SuperLink is the end-to-end tests')."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import cloud.cli.federated as federated_cli
from cloud.cli import build_app
from cloud.client import ApiClient
from tests.cloud.cli_helpers import ok_json
from tests.cloud.conftest import Api
from tests.cloud.test_federated_runs import INPUTS, ROUND_1, Fleet, add_device, make_fleet, progress

APP = build_app(load_plugins=False)


def real(url: str, token: str, *args: str) -> Any:
    env = {"EDGEFLEET_TOKEN": token, "EDGEFLEET_CONFIG": "/nonexistent/edgefleet.toml", "COLUMNS": "300"}
    return CliRunner().invoke(APP, [*args, "--url", url], env=env)


def one_error_line(result: Any) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return str(lines[0])


# -- against a real coordinator, federated learning off ----------------------------------------------------------


def test_a_coordinator_without_federated_learning_says_how_to_enable_it(cli_coordinator: tuple[str, str]) -> None:
    url, token = cli_coordinator
    line = one_error_line(real(url, token, "federated", "run", "digits:1.0", "--to", "site=lab", "--rounds", "3"))
    assert line == (
        "error: federated learning is not enabled on this coordinator (start it with `edgefleet up --federated`) "
        "(HTTP 409)"
    )


def test_listing_status_and_stop_of_runs_that_do_not_exist(cli_coordinator: tuple[str, str]) -> None:
    url, token = cli_coordinator
    empty = real(url, token, "federated", "list", "--json")
    assert empty.exit_code == 0 and json.loads(empty.stdout) == {"data": [], "count": 0}
    assert "federated runs" in real(url, token, "federated", "list", "--status", "running").stdout
    assert one_error_line(real(url, token, "federated", "status", "77")) == (
        "error: federated run 77 does not exist (HTTP 404)"
    )
    assert one_error_line(real(url, token, "federated", "stop", "77")) == (
        "error: federated run 77 does not exist (HTTP 404)"
    )
    bad_status = real(url, token, "federated", "list", "--status", "sideways")
    assert bad_status.exit_code == 1 and "status" in bad_status.output and "HTTP 422" in bad_status.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["digits", "--to", "site=lab"], "model must be NAME:VERSION or NAME@ALIAS"),
        (["digits:1.0", "--to", "lab"], "--to 'lab': use tag=value"),
    ],
)
def test_bad_options_fail_before_asking_the_coordinator(args: list[str], message: str) -> None:
    result = real("http://127.0.0.1:9", "t", "federated", "run", *args)
    assert message in one_error_line(result)


def test_every_command_says_what_it_does() -> None:
    for command in ("run", "status", "list", "stop"):
        result = CliRunner().invoke(APP, ["federated", command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
    run_help = CliRunner().invoke(APP, ["federated", "run", "--help"], env={"COLUMNS": "200"}).stdout
    assert "(default: 3)" in run_help and "(default: fedavg)" in run_help and "(default: 600)" in run_help


# -- in-process, with a fake Flower control ---------------------------------------------------------------------


@pytest.fixture
def fleet(api: Api, tmp_path: Path) -> Iterator[Fleet]:
    yield make_fleet(api, tmp_path)
    api.coordinator.flower = None


@pytest.fixture
def edgefleet(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    client = ApiClient("http://testserver", token=fleet.api.coordinator.admin_token, send=fleet.api.anonymous.request)
    monkeypatch.setattr(federated_cli, "connect", lambda *_args, **_kwargs: client)

    def run(*args: str) -> Any:
        return CliRunner().invoke(APP, ["federated", *args], env={"COLUMNS": "200"})

    return run


def test_run_prints_the_run_and_list_shows_it(fleet: Fleet, edgefleet: Callable[..., Any]) -> None:
    created = edgefleet("run", "m:1.0", "--to", "site=a", "--rounds", "2", "--strategy", "fedprox", "--min-nodes", "3")
    assert created.exit_code == 0, created.output
    assert created.stdout.strip() == "federated run 1: m:1.0 on 3 devices (dev-0, dev-1, dev-2), 2 rounds — pending"
    run = fleet.run(1)
    assert (
        run["params"]["strategy"] == "fedprox" and run["params"]["min_nodes"] == 3 and run["selector"] == {"site": "a"}
    )
    listing = edgefleet("list")
    assert listing.exit_code == 0 and "m:1.0" in listing.stdout and "pending" in listing.stdout
    assert "0/2" in listing.stdout
    assert ok_json(edgefleet("list", "--status", "pending", "--json"))["count"] == 1
    assert ok_json(edgefleet("list", "--model", "other", "--json"))["count"] == 0


def test_run_options_reach_the_request(fleet: Fleet, edgefleet: Callable[..., Any], tmp_path: Path) -> None:
    held_out = tmp_path / "held-out.npz"
    held_out.write_bytes(b"npz")
    options = (
        "--to site=a --local-epochs 2 --lr 0.05 --batch-size 16 --dp-noise 0.5 --dp-clip 3 --min-nodes 3 "
        "--round-timeout 120 --min-samples 20 --eval-fraction 0.5 --rollout canary --max-accuracy-drop 0.1 --json"
    )
    created = ok_json(edgefleet("run", "m:1.0", *options.split(), "--eval-data", str(held_out)))
    assert {k: created["params"][k] for k in ("local_epochs", "lr", "batch_size", "dp_noise", "dp_clip")} == {
        "local_epochs": 2,
        "lr": 0.05,
        "batch_size": 16,
        "dp_noise": 0.5,
        "dp_clip": 3.0,
    }
    assert created["params"]["max_accuracy_drop"] == 0.1 and created["params"]["round_timeout_s"] == 120
    assert created["params"]["eval_data"] == str(held_out.resolve()) and created["params"]["rollout"] == "canary"


def test_refusals_are_one_line(fleet: Fleet, edgefleet: Callable[..., Any]) -> None:
    add_device(fleet.api, "dev-old", node="9100", version="0.9")
    short = one_error_line(edgefleet("run", "m:1.0", "--to", "site=a", "--min-nodes", "5"))
    assert short == (
        "error: cannot start a federated run of m:1.0: 4 devices match site=a: 1 runs m:0.9; 3 eligible < "
        "--min-nodes 5 (HTTP 409)"
    )
    dp = one_error_line(edgefleet("run", "m:1.0", "--dp-noise", "1"))
    assert "dp_noise needs dp_clip" in dp and "(HTTP 422)" in dp
    fleet.api.push("m", "2.0", b"two", format="tflite", inputs=INPUTS)
    assert "has no trainable form: push one with `edgefleet models push --trainable`" in one_error_line(
        edgefleet("run", "m:2.0")
    )


def test_status_shows_rounds_candidate_and_error(fleet: Fleet, edgefleet: Callable[..., Any]) -> None:
    run = fleet.create(rounds=2)
    runner = fleet.runner()
    runner.tick()
    progress(fleet, run["id"], *ROUND_1)
    runner.tick()
    shown = edgefleet("status", str(run["id"]))
    assert shown.exit_code == 0, shown.output
    out = shown.stdout
    assert "federated run 1 m:1.0 — running (Flower run 1000)" in out
    assert "cohort: 3 devices of site=a: dev-0, dev-1, dev-2" in out
    assert "fedavg, 2 rounds, min 2 nodes, 1 local epoch(s), lr 0.01, batch 32" in out
    assert "1/2 rounds" in out
    row = next(line for line in out.splitlines() if "0.7000" in line)
    assert [cell.strip() for cell in row.split("│")[1:6]] == ["1", "3", "0", "0.7000", "80.00%"]

    fleet.flower.set(1000, "finished:completed")
    runner.tick()
    fleet.api.push("m", "1.0-fl1", b"candidate", format="tflite", inputs=INPUTS)
    fleet.api.client.post(f"/api/v1/federated/runs/{run['id']}/candidate", json={"candidate_version": "1.0-fl1"})
    runner.stop()
    done = edgefleet("status", str(run["id"]))
    assert "— completed" in done.stdout and "candidate: m:1.0-fl1" in done.stdout
    assert edgefleet("status", str(run["id"]), "--watch").exit_code == 0

    failed = fleet.create(selector={"site": "a"})
    fleet.api.client.post(f"/api/v1/federated/runs/{failed['id']}/stop")
    shown = edgefleet("status", str(failed["id"]))
    assert "— stopped" in shown.stdout and "error: stopped by admin" in shown.stdout
    watched = edgefleet("status", str(failed["id"]), "--watch", "--json")
    assert watched.exit_code == 1
    assert json.loads(watched.stdout.splitlines()[-1])["status"] == "stopped"


def test_run_watch_follows_the_run_and_exits_1_when_it_fails(fleet: Fleet, edgefleet: Callable[..., Any]) -> None:
    runner = fleet.runner()
    done = threading.Event()

    def drive() -> None:  # the coordinator's runner and Flower, moving the run along while the CLI watches
        while not done.is_set():
            runner.tick()
            if 1000 in fleet.flower.statuses:
                fleet.flower.set(1000, "finished:failed", "ServerApp failed with exception: no samples")
            time.sleep(0.05)

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    try:
        watched = edgefleet("run", "m:1.0", "--to", "site=a", "--watch", "--interval", "0.05")
    finally:
        done.set()
        driver.join(5)
    assert watched.exit_code == 1, watched.output
    assert "federated run 1: m:1.0 on 3 devices" in watched.stdout
    assert "error: Flower run 1000 failed: ServerApp failed with exception: no samples" in watched.stdout


def test_stop_prints_the_new_status_and_a_second_stop_is_one_line(fleet: Fleet, edgefleet: Callable[..., Any]) -> None:
    run = fleet.create()
    stopped = edgefleet("stop", str(run["id"]))
    assert stopped.exit_code == 0 and stopped.stdout.strip() == "federated run 1: stopped"
    assert one_error_line(edgefleet("stop", str(run["id"]))) == "error: federated run 1 is stopped already (HTTP 409)"
