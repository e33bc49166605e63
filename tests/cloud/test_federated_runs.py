"""Federated runs on the coordinator: who trains (the cohort rules, as a table), what a run request may ask, the
runner's state chain against a fake Flower control (the real SuperLink is the end-to-end tests'), a restart in the
middle of it, and the candidate builder's report."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import sys
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, col, select

from cloud.federation.cohort import CohortDevice, select_cohort, shortfall
from cloud.federation.flower import FlowerError, FlowerRunStatus
from cloud.federation.runner import TOKEN_PREFIX, FederatedRunner
from cloud.models import ApiToken, AuditEntry, Device, FederatedRun, FlowerNode, ModelVersion
from cloud.services.tokens import authenticate_token
from tests.cloud.conftest import Api

INPUTS = '[{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]'
RUNS = "/api/v1/federated/runs"

# -- the cohort rules (pure) ---------------------------------------------------------------------------------

NODES = {"ok": "11", "updating": "12", "behind": "13", "other": "14", "none": "15", "offline": "16", "busy": "17"}


@pytest.mark.parametrize(
    "device, reason",
    [
        (CohortDevice("ok", {"site": "a"}, model_name="m", model_version="1.0"), None),
        (
            CohortDevice(
                "updating",
                {"site": "a"},
                model_name="m",
                model_version="1.0",
                update_phase="downloading",
                desired_generation=2,
                reported_generation=2,
            ),
            "updating",
        ),
        (
            CohortDevice(
                "behind",
                {"site": "a"},
                model_name="m",
                model_version="1.0",
                update_phase="active",
                desired_generation=3,
                reported_generation=2,
            ),
            "updating",
        ),
        (CohortDevice("other", {"site": "a"}, model_name="m", model_version="0.9"), "runs:m:0.9"),
        (CohortDevice("none", {"site": "a"}), "runs:no model"),
        (CohortDevice("offline", {"site": "a"}, status="offline", model_name="m", model_version="1.0"), "offline"),
        (CohortDevice("unknown", {"site": "a"}, status="unknown", model_name="m", model_version="1.0"), "unknown"),
        (CohortDevice("revoked", {"site": "a"}, enrolment="revoked", model_name="m", model_version="1.0"), "revoked"),
        (CohortDevice("pending", {"site": "a"}, enrolment="pending"), "pending"),
        (CohortDevice("no-node", {"site": "a"}, model_name="m", model_version="1.0"), "no_node"),
        (CohortDevice("busy", {"site": "a"}, model_name="m", model_version="1.0"), "busy"),
        (
            CohortDevice(
                "failed",
                {"site": "a"},
                model_name="m",
                model_version="1.0",
                update_phase="failed",
                desired_generation=4,
                reported_generation=4,
                status="online",
            ),
            None,
        ),
    ],
)
def test_cohort_rules(device: CohortDevice, reason: str | None) -> None:
    nodes = NODES | {"failed": "18"}
    cohort = select_cohort([device], selector={"site": "a"}, model="m", version="1.0", nodes=nodes, busy={"busy": 3})
    assert cohort.matched == 1
    if reason is None:
        assert cohort.eligible == {device.id: nodes[device.id]} and not cohort.excluded
    else:
        assert cohort.excluded == {reason: [device.id]} and not cohort.eligible


def test_a_short_cohort_counts_every_reason_in_one_line() -> None:
    devices = [
        CohortDevice("a1", {"site": "a"}, model_name="digits-cnn", model_version="1.0"),
        CohortDevice("a2", {"site": "a"}, model_name="digits-cnn", model_version="1.0"),
        CohortDevice("a3", {"site": "a"}, model_name="digits-cnn", model_version="1.0", update_phase="loading"),
        CohortDevice("a4", {"site": "a"}, model_name="digits-cnn", model_version="0.9"),
        CohortDevice("b1", {"site": "b"}, model_name="digits-cnn", model_version="1.0"),  # not selected
        CohortDevice("a5", {"site": "a"}, enrolment="decommissioned"),  # not in the fleet
    ]
    nodes = {d.id: str(i) for i, d in enumerate(devices)}
    cohort = select_cohort(devices, selector={"site": "a"}, model="digits-cnn", version="1.0", nodes=nodes)
    assert shortfall(cohort, selector={"site": "a"}, min_nodes=3) == (
        "4 devices match site=a: 1 runs digits-cnn:0.9, 1 is updating; 2 eligible < --min-nodes 3"
    )
    assert shortfall(cohort, selector={"site": "a"}, min_nodes=2) is None
    none = select_cohort(devices, selector={"site": "z"}, model="digits-cnn", version="1.0", nodes=nodes)
    assert shortfall(none, selector={"site": "z"}, min_nodes=2) == "no device matches site=z"
    whole = select_cohort(devices[:1], selector={}, model="digits-cnn", version="1.0", nodes={})
    assert shortfall(whole, selector={}, min_nodes=2) == (
        "1 device is in the fleet: 1 has no registered SuperNode; 0 eligible < --min-nodes 2"
    )


# -- a coordinator with a fake Flower control ----------------------------------------------------------------


def pt2(seed: str = "a") -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:  # fixed timestamps: the same seed gives the same bytes
        for name, data in (("model/archive_format", b"pt2"), ("model/data/weights/weight_0", seed.encode() * 32)):
            archive.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), data)
    return out.getvalue()


@dataclass
class FakeFlower:
    """The run part of `FlowerControl`, in memory: what was started and stopped, and the statuses to report."""

    statuses: dict[int, FlowerRunStatus] = field(default_factory=dict)
    started: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)
    stopped: list[int] = field(default_factory=list)
    refuse: str | None = None
    next_id: int = 1000

    def start_run(self, app_dir: Path, run_config: Mapping[str, str | int | float | bool]) -> int:
        if self.refuse:
            raise FlowerError(f"start a run of app failed: {self.refuse}")
        self.started.append((app_dir, dict(run_config)))
        run_id, self.next_id = self.next_id, self.next_id + 1
        self.statuses[run_id] = FlowerRunStatus("starting", "")
        return run_id

    def run_status(self, run_id: int) -> FlowerRunStatus:
        return self.statuses[run_id]

    def stop_run(self, run_id: int) -> None:
        self.stopped.append(run_id)
        self.statuses[run_id] = FlowerRunStatus("finished:stopped", "")

    def set(self, run_id: int, status: str, details: str = "") -> None:
        self.statuses[run_id] = FlowerRunStatus(status, details)


SLEEPER = "import sys, time; time.sleep(60)"
REPORTS_ENV = (
    "import json, os, sys; "
    "json.dump({k: os.environ.get(k) for k in ('EDGEFLEET_URL', 'EDGEFLEET_TOKEN', 'EDGEFLEET_CONFIG')}, "
    "open('builder-env.json', 'w')); sys.argv[1]"
)
FAILS = "import sys; print('loading final.npz'); sys.stderr.write('ValueError: shapes differ\\n'); sys.exit(3)"


@dataclass
class Fleet:
    api: Api
    flower: FakeFlower
    template: Path
    data_dir: Path

    def runner(self, builder: str = SLEEPER, **kwargs: Any) -> FederatedRunner:
        return FederatedRunner(
            engine=self.api.coordinator.engine,
            store=self.api.coordinator.store,
            data_dir=self.data_dir,
            flower=lambda: self.flower,
            api_url=lambda: "http://127.0.0.1:9",
            template=self.template,
            builder_command=(sys.executable, "-c", builder),
            **kwargs,
        )

    def create(self, **body: Any) -> dict[str, Any]:
        response = self.api.client.post(RUNS, json={"model": "m:1.0", "selector": {"site": "a"}, **body})
        assert response.status_code == 201, response.text
        return dict(response.json())

    def run(self, run_id: int) -> dict[str, Any]:
        return dict(self.api.client.get(f"{RUNS}/{run_id}").json())

    def result(self, run_id: int) -> Path:
        return self.data_dir / "federated" / "runs" / str(run_id) / "result"


def add_device(
    api: Api, device_id: str, *, node: str | None, site: str = "a", version: str | None = "1.0", **fields: Any
) -> None:
    with Session(api.coordinator.engine) as session:
        session.add(
            Device(
                id=device_id,
                enrolment=fields.pop("enrolment", "enrolled"),
                tags={"site": site},
                status=fields.pop("status", "online"),
                active_model_name="m" if version else None,
                active_model_version=version,
                **fields,
            )
        )
        if node is not None:
            session.add(FlowerNode(device_id=device_id, node_id=node, public_key=f"ecdsa-sha2-nistp256 {device_id}"))
        session.commit()


@pytest.fixture
def fleet(api: Api, tmp_path: Path) -> Iterator[Fleet]:
    """m:1.0 with a trainable form, three eligible devices at site=a, a Flower App template, a fake Flower."""
    yield make_fleet(api, tmp_path)
    api.coordinator.flower = None


def make_fleet(api: Api, tmp_path: Path) -> Fleet:
    """What the `fleet` fixture sets up (the CLI tests use it too)."""
    api.push("m", "1.0", b"model one", format="tflite", inputs=INPUTS)
    stored = api.client.put("/api/v1/models/m/versions/1.0/trainable", content=pt2())
    assert stored.status_code == 200, stored.text
    for index in range(3):
        add_device(api, f"dev-{index}", node=str(9000 + index))
    template = tmp_path / "flowerapp"
    (template / "edgefleet_fl").mkdir(parents=True)
    (template / "pyproject.toml").write_text('[project]\nname = "edgefleet-fl"\n')
    (template / "edgefleet_fl" / "server_app.py").write_text("app = None\n")
    (template / "edgefleet_fl" / "__pycache__").mkdir()
    (template / "edgefleet_fl" / "__pycache__" / "server_app.cpython-311.pyc").write_bytes(b"\0")
    flower = FakeFlower()
    api.coordinator.flower = flower  # type: ignore[assignment]
    return Fleet(api, flower, template, api.coordinator.settings.data_dir)


# -- what a run request may ask --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, field_, fragment",
    [
        ({"rounds": 0}, "body.rounds", "greater than or equal to 1"),
        ({"rounds": 101}, "body.rounds", "less than or equal to 100"),
        ({"strategy": "fedsgd"}, "body.strategy", "'fedavg' or 'fedprox'"),
        ({"min_nodes": 1}, "body.min_nodes", "greater than or equal to 2"),
        ({"model": "m"}, "body.model", "should match pattern"),
        ({"roundz": 3}, "body.roundz", "Extra inputs are not permitted"),
        ({"rollout": "everywhere"}, "body.rollout", "'canary'"),
        ({"dp_noise": 0.5}, "dp_clip", "dp_noise needs dp_clip"),
        ({"dp_clip": 5.0}, "dp_clip", "dp_clip applies only with dp_noise > 0"),
        ({"proximal_mu": 0.1}, "proximal_mu", "applies to the fedprox strategy only"),
        ({"secagg": True, "min_nodes": 2}, "min_nodes", "secure aggregation needs at least 3 nodes"),
        ({"eval_data": "held-out.npz"}, "eval_data", "is not a file on the coordinator host"),
    ],
)
def test_a_request_that_asks_for_the_impossible_is_a_422_naming_the_field(
    fleet: Fleet, body: dict[str, Any], field_: str, fragment: str
) -> None:
    response = fleet.api.client.post(RUNS, json={"model": "m:1.0", "selector": {"site": "a"}} | body)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field_ and fragment in response.json()["detail"]


def test_refused_when_federated_learning_is_off(api: Api) -> None:
    response = api.client.post(RUNS, json={"model": "m:1.0"})
    assert response.status_code == 409
    assert response.json()["detail"] == (
        "federated learning is not enabled on this coordinator (start it with `edgefleet up --federated`)"
    )


def test_unknown_version_is_404_and_one_without_trainable_form_409(fleet: Fleet) -> None:
    missing = fleet.api.client.post(RUNS, json={"model": "m:9.9"})
    assert missing.status_code == 404 and missing.json()["detail"] == "model 'm' has no version '9.9'"
    fleet.api.push("m", "2.0", b"model two", format="tflite", inputs=INPUTS)
    bare = fleet.api.client.post(RUNS, json={"model": "m:2.0"})
    assert bare.status_code == 409
    assert bare.json()["detail"] == (
        "version m:2.0 has no trainable form: push one with `edgefleet models push --trainable`"
    )


def test_a_trainable_form_too_big_for_a_flower_app_is_refused(fleet: Fleet) -> None:
    with Session(fleet.api.coordinator.engine) as session:
        record = session.exec(select(ModelVersion).where(ModelVersion.version == "1.0")).one()
        record.trainable = dict(record.trainable or {}) | {"size": 11_000_000}
        session.add(record)
        session.commit()
    response = fleet.api.client.post(RUNS, json={"model": "m:1.0"})
    assert response.status_code == 409 and "a Flower App carries at most 10.5 MB" in response.json()["detail"]


def test_too_few_eligible_devices_is_a_409_counting_why(fleet: Fleet) -> None:
    add_device(fleet.api, "dev-old", node="9100", version="0.9")
    add_device(fleet.api, "dev-updating", node="9101", update_phase="downloading", desired_generation=2)
    add_device(fleet.api, "dev-no-node", node=None)
    add_device(fleet.api, "dev-b", node="9102", site="b")
    response = fleet.api.client.post(RUNS, json={"model": "m:1.0", "selector": {"site": "a"}, "min_nodes": 4})
    assert response.status_code == 409
    assert response.json()["detail"] == (
        "cannot start a federated run of m:1.0: 6 devices match site=a: 1 runs m:0.9, 1 is updating, "
        "1 has no registered SuperNode; 3 eligible < --min-nodes 4"
    )


def test_a_run_names_its_cohort_and_resolved_parameters_and_busy_devices_are_left_out(fleet: Fleet) -> None:
    fleet.api.client.put("/api/v1/models/m/aliases/prod", json={"version": "1.0"})
    run = fleet.create(model="m@prod", strategy="fedprox", rounds=2)
    assert run["status"] == "pending" and run["model_name"] == "m" and run["parent_version"] == "1.0"
    assert run["devices"] == ["dev-0", "dev-1", "dev-2"] and run["node_ids"] == ["9000", "9001", "9002"]
    assert run["params"]["proximal_mu"] == 0.1 and run["params"]["alias"] == "prod"
    assert run["params"]["result_dir"] == str(fleet.result(run["id"]).resolve())
    again = fleet.api.client.post(RUNS, json={"model": "m:1.0", "selector": {"site": "a"}})
    assert again.status_code == 409 and "3 are in another federated run" in again.json()["detail"]
    listing = fleet.api.client.get(RUNS, params={"model": "m", "status": "pending"}).json()
    assert listing["count"] == 1 and listing["data"][0]["id"] == run["id"]
    assert fleet.api.client.get(RUNS, params={"status": "running"}).json()["count"] == 0
    assert fleet.api.client.get(RUNS, params={"status": "sideways"}).status_code == 422
    assert fleet.api.client.get(f"{RUNS}/999").status_code == 404
    with Session(fleet.api.coordinator.engine) as session:
        actions = [e.action for e in session.exec(select(AuditEntry).where(AuditEntry.subject == str(run["id"])))]
    assert "federated_run.created" in actions


# -- the runner's state chain ----------------------------------------------------------------------------------


def progress(fleet: Fleet, run_id: int, *lines: dict[str, Any], partial: str = "") -> None:
    path = fleet.result(run_id) / "progress.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + partial)


ROUND_1 = [
    {"round": 1, "phase": "train", "replies": 3, "failures": 0, "nodes": ["9000"], "metrics": {"train_loss": 0.7}},
    {"round": 1, "phase": "evaluate", "replies": 3, "failures": 0, "nodes": ["9000"], "metrics": {"eval_acc": 0.8}},
]


def wait_exit(runner: FederatedRunner, run_id: int) -> None:
    builder = runner._builders[run_id]
    assert builder.process is not None
    builder.process.wait(timeout=60)


def test_pending_running_building_completed(fleet: Fleet) -> None:
    run = fleet.create(rounds=2, dp_noise=0.3, dp_clip=4.0)
    runner = fleet.runner(REPORTS_ENV)

    runner.tick()
    running = fleet.run(run["id"])
    assert running["status"] == "running" and running["flower_run_id"] == "1000"
    app, config = fleet.flower.started[0]
    assert app == fleet.data_dir / "federated" / "runs" / str(run["id"]) / "app"
    assert (app / "pyproject.toml").is_file() and (app / "edgefleet_fl" / "server_app.py").is_file()
    assert not (app / "edgefleet_fl" / "__pycache__").exists()
    trainable = json.loads((app / "trainable.json").read_text())
    assert base64.b64decode(trainable["program_b64"]) == pt2()
    assert trainable == {"format": "torch.export", "sha256": hashlib.sha256(pt2()).hexdigest()} | {
        "program_b64": trainable["program_b64"]
    }
    assert config == {
        "model": "m:1.0",
        "node-ids": "9000,9001,9002",
        "num-server-rounds": 2,
        "strategy": "fedavg",
        "proximal-mu": 0.0,
        "local-epochs": 1,
        "lr": 0.01,
        "batch-size": 32,
        "min-nodes": 2,
        "round-timeout": 600.0,
        "dp-noise": 0.3,
        "dp-clip": 4.0,
        "secagg": False,
        "min-samples": 10,
        "eval-fraction": 0.2,
        "result-dir": str(fleet.result(run["id"]).resolve()),
    }

    fleet.flower.set(1000, "running")
    progress(fleet, run["id"], *ROUND_1, partial='{"round": 2, "pha')
    runner.tick()
    assert fleet.run(run["id"])["rounds"] == ROUND_1

    summary = {"rounds": 2, "nodes": ["9000"], "train": {}, "evaluate": {}, "dp": None, "epsilon": None}
    (fleet.result(run["id"]) / "summary.json").write_text(json.dumps(summary))
    fleet.flower.set(1000, "finished:completed")
    runner.tick()
    building = fleet.run(run["id"])
    assert building["status"] == "building" and building["summary"] == summary
    wait_exit(runner, run["id"])
    env = json.loads((fleet.data_dir / "federated" / "runs" / str(run["id"]) / "builder-env.json").read_text())
    assert env["EDGEFLEET_URL"] == "http://127.0.0.1:9" and env["EDGEFLEET_TOKEN"].startswith("efa_")
    with Session(fleet.api.coordinator.engine) as session:
        principal = authenticate_token(session=session, presented=env["EDGEFLEET_TOKEN"], admin_token="x")
    assert principal is not None and principal.name.startswith(f"{TOKEN_PREFIX}{run['id']}-1-")

    # The builder (here: the test, as it would) pushes the candidate and reports it before it exits.
    fleet.api.push("m", "1.0-fl1", b"candidate", format="tflite", inputs=INPUTS)
    done = fleet.api.anonymous.post(
        f"{RUNS}/{run['id']}/candidate",
        json={"candidate_version": "1.0-fl1", "rollout_id": None, "error": None},
        headers={"Authorization": f"Bearer {env['EDGEFLEET_TOKEN']}"},
    )
    assert done.status_code == 200, done.text
    runner.tick()
    completed = fleet.run(run["id"])
    assert completed["status"] == "completed" and completed["candidate_version"] == "1.0-fl1"
    assert completed["finished_at"] is not None and completed["error"] is None
    with Session(fleet.api.coordinator.engine) as session:
        assert authenticate_token(session=session, presented=env["EDGEFLEET_TOKEN"], admin_token="x") is None
        actions = [e.action for e in session.exec(select(AuditEntry).where(AuditEntry.subject == str(run["id"])))]
    assert actions == ["federated_run.created", "federated_run.finished"]
    assert not runner._builders


@pytest.mark.parametrize(
    "flower_status, details, status, error",
    [
        ("finished:failed", "ServerApp failed with exception: boom", "failed",
         "Flower run 1000 failed: ServerApp failed with exception: boom"),
        ("finished:failed", "", "failed", "Flower run 1000 failed: no details given"),
        ("finished:stopped", "", "stopped", "Flower run 1000 was stopped"),
    ],
)  # fmt: skip
def test_a_flower_run_that_fails_or_is_stopped_ends_the_run(
    fleet: Fleet, flower_status: str, details: str, status: str, error: str
) -> None:
    run = fleet.create()
    runner = fleet.runner()
    runner.tick()
    progress(fleet, run["id"], ROUND_1[0])
    fleet.flower.set(1000, flower_status, details)
    runner.tick()
    ended = fleet.run(run["id"])
    assert (ended["status"], ended["error"]) == (status, error)
    assert ended["rounds"] == [ROUND_1[0]] and ended["finished_at"] is not None


def test_a_run_flower_does_not_start_in_time_fails(fleet: Fleet) -> None:
    run = fleet.create()
    now = [time.time()]
    runner = fleet.runner(start_timeout_s=60, clock=lambda: now[0])
    runner.tick()
    runner.tick()
    assert fleet.run(run["id"])["status"] == "running"
    now[0] += 120
    runner.tick()
    failed = fleet.run(run["id"])
    assert failed["status"] == "failed" and failed["error"].startswith("Flower run 1000 did not start within 1")
    assert "still starting" in failed["error"] and fleet.flower.stopped == [1000]


def test_flower_refusing_to_start_fails_the_run(fleet: Fleet) -> None:
    run = fleet.create()
    fleet.flower.refuse = "[code: 3] the FAB is too large"
    fleet.runner().tick()
    failed = fleet.run(run["id"])
    assert failed["status"] == "failed"
    assert failed["error"] == "Flower did not start the run: start a run of app failed: [code: 3] the FAB is too large"


def test_a_missing_template_fails_the_run_with_where_it_was_looked_for(fleet: Fleet) -> None:
    run = fleet.create()
    runner = fleet.runner()
    runner.template = fleet.template / "nowhere"
    runner.tick()
    failed = fleet.run(run["id"])
    assert failed["status"] == "failed" and "the Flower App template is missing" in failed["error"]
    assert not fleet.flower.started


def test_stop_a_running_run_stops_its_flower_run(fleet: Fleet) -> None:
    run = fleet.create()
    fleet.runner().tick()
    stopped = fleet.api.client.post(f"{RUNS}/{run['id']}/stop")
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["status"] == "stopped" and stopped.json()["error"] == "stopped by admin"
    assert fleet.flower.stopped == [1000]
    again = fleet.api.client.post(f"{RUNS}/{run['id']}/stop")
    assert again.status_code == 409 and again.json()["detail"] == f"federated run {run['id']} is stopped already"


def test_stop_before_the_runner_starts_it_cancels_the_run(fleet: Fleet) -> None:
    run = fleet.create()
    assert fleet.api.client.post(f"{RUNS}/{run['id']}/stop").json()["status"] == "stopped"
    fleet.runner().tick()
    assert not fleet.flower.started and fleet.run(run["id"])["status"] == "stopped"


def test_stop_while_building_ends_the_builder_and_revokes_its_token(fleet: Fleet) -> None:
    run = fleet.create()
    runner = fleet.runner(SLEEPER)
    runner.tick()
    fleet.flower.set(1000, "finished:completed")
    runner.tick()
    process = runner._builders[run["id"]].process
    assert process is not None and process.poll() is None
    assert fleet.api.client.post(f"{RUNS}/{run['id']}/stop").json()["status"] == "stopped"
    runner.tick()
    assert process.poll() is not None and not runner._builders
    assert not live_tokens(fleet)
    refused = fleet.api.client.post(f"{RUNS}/{run['id']}/candidate", json={"candidate_version": "1.0"})
    assert refused.status_code == 409 and "is stopped, not building" in refused.json()["detail"]


def live_tokens(fleet: Fleet) -> list[str]:
    with Session(fleet.api.coordinator.engine) as session:
        statement = select(ApiToken.name).where(
            col(ApiToken.name).startswith(TOKEN_PREFIX), col(ApiToken.revoked_at).is_(None)
        )
        return list(session.exec(statement))


def test_a_builder_that_fails_fails_the_run_with_its_last_lines(fleet: Fleet) -> None:
    run = fleet.create()
    runner = fleet.runner(FAILS)
    runner.tick()
    fleet.flower.set(1000, "finished:completed")
    runner.tick()
    wait_exit(runner, run["id"])
    runner.tick()
    failed = fleet.run(run["id"])
    assert failed["status"] == "failed"
    assert failed["error"].startswith("the candidate builder exited with status 3: --- candidate builder, attempt 1")
    assert failed["error"].endswith("loading final.npz | ValueError: shapes differ")
    assert not live_tokens(fleet)


def test_a_builder_that_exits_without_reporting_fails_the_run(fleet: Fleet) -> None:
    run = fleet.create()
    runner = fleet.runner("pass")
    runner.tick()
    fleet.flower.set(1000, "finished:completed")
    runner.tick()
    wait_exit(runner, run["id"])
    runner.tick()
    failed = fleet.run(run["id"])
    assert failed["status"] == "failed"
    assert failed["error"].startswith("the candidate builder exited without reporting a candidate")


# -- a restart in the middle -----------------------------------------------------------------------------------


def test_a_restarted_coordinator_reattaches_to_a_running_run(fleet: Fleet) -> None:
    run = fleet.create()
    fleet.runner().tick()
    assert fleet.run(run["id"])["status"] == "running"

    fresh = fleet.runner()  # nothing in memory: all from the database and the run directory
    fleet.flower.set(1000, "running")
    progress(fleet, run["id"], *ROUND_1)
    fresh.tick()
    assert fleet.run(run["id"])["rounds"] == ROUND_1 and len(fleet.flower.started) == 1


def test_a_crash_between_starting_flower_and_recording_it_does_not_start_twice(fleet: Fleet) -> None:
    run = fleet.create()
    directory = fleet.data_dir / "federated" / "runs" / str(run["id"])
    directory.mkdir(parents=True)
    (directory / "flower-run-id").write_text("4242\n")  # Flower started it; the coordinator died before the commit
    fleet.flower.set(4242, "running")
    fleet.runner().tick()
    running = fleet.run(run["id"])
    assert running["status"] == "running" and running["flower_run_id"] == "4242" and not fleet.flower.started


def test_a_restart_while_building_waits_for_a_live_builder_else_starts_it_once_more(fleet: Fleet) -> None:
    run = fleet.create()
    first = fleet.runner(SLEEPER)
    first.tick()
    fleet.flower.set(1000, "finished:completed")
    first.tick()
    builder = first._builders[run["id"]].process
    assert builder is not None
    directory = fleet.data_dir / "federated" / "runs" / str(run["id"])

    assert builder.poll() is None, (builder.returncode, (directory / "candidate.log").read_text())
    second = fleet.runner(SLEEPER)  # the coordinator restarted; the builder lives on
    second.tick()
    assert (directory / "candidate.attempts").read_text().strip() == "1"
    assert run["id"] in second._builders and second._builders[run["id"]].process is None
    assert len(live_tokens(fleet)) == 1

    os.kill(builder.pid, signal.SIGKILL)
    builder.wait()
    second.tick()  # gone: its exit is unknown, so the next tick starts it once more
    second.tick()
    assert (directory / "candidate.attempts").read_text().strip() == "2"
    assert fleet.run(run["id"])["status"] == "building" and len(live_tokens(fleet)) == 1
    second.stop()  # a coordinator stop ends the builders it started

    third = fleet.runner(SLEEPER)
    third.tick()
    failed = fleet.run(run["id"])
    assert failed["status"] == "failed"
    assert failed["error"].startswith("the candidate builder ended 2 times without reporting")
    assert not live_tokens(fleet)


# -- the candidate report ---------------------------------------------------------------------------------------


def building_run(fleet: Fleet) -> tuple[FederatedRunner, int]:
    run = fleet.create()
    runner = fleet.runner(SLEEPER)
    runner.tick()
    fleet.flower.set(1000, "finished:completed")
    runner.tick()
    assert fleet.run(run["id"])["status"] == "building"
    return runner, int(run["id"])


def test_the_candidate_report_is_checked(fleet: Fleet) -> None:
    pending = fleet.create(selector={}, min_nodes=2)
    early = fleet.api.client.post(f"{RUNS}/{pending['id']}/candidate", json={"candidate_version": "1.0"})
    assert early.status_code == 409 and "is pending, not building" in early.json()["detail"]
    fleet.api.client.post(f"{RUNS}/{pending['id']}/stop")

    runner, run_id = building_run(fleet)
    try:
        empty = fleet.api.client.post(f"{RUNS}/{run_id}/candidate", json={})
        assert empty.status_code == 422 and empty.json()["field"] == "candidate_version"
        unknown = fleet.api.client.post(f"{RUNS}/{run_id}/candidate", json={"candidate_version": "7.7"})
        assert unknown.status_code == 422 and "model 'm' has no version '7.7'" in unknown.json()["detail"]
        failed = fleet.api.client.post(f"{RUNS}/{run_id}/candidate", json={"error": "accuracy fell: 0.91 < 0.97"})
        assert failed.status_code == 200
        assert failed.json()["status"] == "failed"
        assert failed.json()["error"] == "candidate not built: accuracy fell: 0.91 < 0.97"
    finally:
        runner.stop()


def test_a_run_stays_in_the_database_shape_the_builder_reads(fleet: Fleet) -> None:
    run = fleet.create(eval_fraction=0.5)
    with Session(fleet.api.coordinator.engine) as session:
        row = session.get(FederatedRun, run["id"])
        assert row is not None and row.params["eval_fraction"] == 0.5
    for key in ("model_name", "parent_version", "selector", "params", "devices", "node_ids", "rounds"):
        assert key in run
