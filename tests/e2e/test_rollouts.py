"""Rollouts end to end: a coordinator process, Mosquitto, and a fleet of real agents serving real traffic.

Traffic is digits of classes 0-2 only, so a model whose predicted classes are rotated shows up as a class
shift (with balanced digits a rotation would keep the distribution and no statistic could see it).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from agent import Agent
from cloud.client import ApiClient
from compression.reference import load_digits_split, shifted_model
from simulators import CoordinatorProcess, FleetConfig, SimulatedFleet, slow_model
from tests.e2e.test_restarts import occupied_port
from tests.services import fresh_postgres_database, run_fleet_mosquitto

pytestmark = pytest.mark.e2e

GROUP = {"group": "ro"}
NO_GATES = dict.fromkeys(["max_install_failure_rate", "max_error_rate_increase", "max_p95_latency_ratio", "max_psi"])
QUICK_GATES = {"min_inferences": 40, "min_class_samples": 40, "max_p95_latency_ratio": 10.0}


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


class FixedPortCoordinator(CoordinatorProcess):
    """`edgefleet up` on a port chosen once, so artifact URLs stay valid across a kill and restart."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("--port") + 1] = str(self.port)
        return cmd


class Traffic:
    """Inference requests of digits 0-2 to every agent in a background thread, until stopped."""

    def __init__(self, agents: Callable[[], Sequence[Agent]]) -> None:
        split = load_digits_split()
        self.samples = split.x_test[split.y_test <= 2].astype(np.float32)
        self.agents = agents
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(10)

    def _run(self) -> None:
        index = 0
        while not self.stopping.is_set():
            for agent in list(self.agents()):
                for _ in range(4):
                    index = (index + 1) % len(self.samples)
                    with contextlib.suppress(Exception):  # no model yet, or mid-switch
                        agent.infer({"input": self.samples[index][np.newaxis]})
            time.sleep(0.02)


class Api:
    """The rollout routes over HTTP with the admin token."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = httpx.request(
            method,
            f"{self.client.url}/api/v1{path}",
            headers={"Authorization": f"Bearer {self.client.token}"},
            timeout=30,
            **kwargs,
        )
        assert response.status_code < 400, response.text
        return response.json()

    def create(self, **plan: Any) -> dict[str, Any]:
        body = {"model": "digits", "version": "2.0", "previous_version": "1.0", "selector": {"tags": GROUP}, **plan}
        return dict(self.request("POST", "/rollouts", json=body))

    def rollout(self, rollout_id: int) -> dict[str, Any]:
        return dict(self.request("GET", f"/rollouts/{rollout_id}", params={"decisions": 10_000}))

    def status(self, rollout_id: int) -> str:
        return str(self.rollout(rollout_id)["status"])

    def dispatches(self, rollout_id: int, kind: str = "dispatch") -> Counter[str]:
        """How many desired generations the rollout gave each device (deployments it made, per device)."""
        counts: Counter[str] = Counter()
        for deployment in self.request("GET", "/deployments", params={"limit": 1000})["data"]:
            target = deployment["target"]
            if target.get("rollout_id") == rollout_id and target.get("kind") == kind:
                counts.update(t["device_id"] for t in deployment["targets"])
        return counts


def cli(client: ApiClient, *args: str) -> Any:
    """Run `edgefleet rollouts ... --json` against the coordinator and parse its output."""
    exe = Path(sys.executable).parent / "edgefleet"
    result = subprocess.run(
        [str(exe), "rollouts", *args, "--url", client.url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"EDGEFLEET_TOKEN": client.token or "", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    if "--watch" in args:  # one JSON line per change
        return [json.loads(line) for line in result.stdout.splitlines()]
    return json.loads(result.stdout)


@pytest.fixture
def coordinator(
    topic_base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[FixedPortCoordinator]:
    """A coordinator on Mosquitto and SQLite; parametrized indirectly: `embedded-sqlite`, `mosquitto-postgres`."""
    monkeypatch.setenv("EDGEFLEET_ROLLOUT_TICK_S", "0.2")
    backend = getattr(request, "param", "mosquitto-sqlite")
    data_dir = tmp_path / "coordinator"
    with contextlib.ExitStack() as stack:
        if backend == "embedded-sqlite":  # its own broker, the default port taken by another program
            busy = stack.enter_context(occupied_port())
            settings = tmp_path / "coordinator.toml"
            settings.write_text(f"embedded_broker_port = {busy}\n")
            process = FixedPortCoordinator(data_dir, topic_base=topic_base, extra_args=("--config", str(settings)))
        else:
            broker = stack.enter_context(run_fleet_mosquitto(tmp_path / "broker", data_dir, topic_base))
            database = stack.enter_context(fresh_postgres_database()) if backend == "mosquitto-postgres" else None
            process = FixedPortCoordinator(
                data_dir,
                mqtt_url=broker.url,
                database_url=database,
                topic_base=topic_base,
                extra_args=broker.coordinator_args,
            )
        process.start()
        try:
            yield process
        finally:
            process.stop()


def start_fleet(client: ApiClient, topic_base: str, root: Path, devices: int, prefix: str = "ro") -> SimulatedFleet:
    config = FleetConfig(
        devices=devices,
        data_root=root,
        coordinator_url=client.url,
        api_token=client.token,
        topic_base=topic_base,
        id_prefix=prefix,
        tags=GROUP,
        http=False,
        telemetry_interval_s=0.5,
    )
    fleet = SimulatedFleet(config)
    fleet.start()
    return fleet


@pytest.fixture
def fleet_on_1(
    coordinator: FixedPortCoordinator, topic_base: str, tmp_path: Path, digits_model_path: Path
) -> Iterator[SimulatedFleet]:
    """Eight agents running digits 1.0, deployed the ordinary way."""
    client = coordinator.client()
    client.push_model(digits_model_path, name="digits", version="1.0")
    fleet = start_fleet(client, topic_base, tmp_path / "fleet", 8)
    try:
        wait_until(lambda: {d["id"] for d in client.devices()} >= set(fleet.device_ids), 30, "devices to enrol")
        client.deploy(model="digits", version="1.0", tags=GROUP)
        assert fleet.wait_for_version("1.0", 60), "the fleet did not converge on 1.0"
        yield fleet
    finally:
        fleet.stop()


def push_2(client: ApiClient, tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "digits-2.onnx"
    path.write_bytes(content)
    client.push_model(path, name="digits", version="2.0")


def test_good_version_passes_every_wave_created_and_watched_with_the_cli(
    coordinator: FixedPortCoordinator, fleet_on_1: SimulatedFleet, tmp_path: Path, digits_model_bytes: bytes
) -> None:
    client = coordinator.client()
    push_2(client, tmp_path, digits_model_bytes)
    api = Api(client)
    with Traffic(lambda: fleet_on_1.agents):
        created = cli(
            client,
            "create",
            "digits:2.0",
            "--from",
            "1.0",
            "--to",
            "group=ro",
            "--waves",
            "2,100%",
            "--bake",
            "2s",
            "--on-failure",
            "rollback",
            "--gate",
            "p95<10",
            "--min-samples",
            "40",
        )
        changes = cli(client, "status", str(created["id"]), "--watch", "--interval", "0.5", "--timeout", "90")
    assert changes[-1]["status"] == "completed"
    assert changes[-1]["counts"] == {"succeeded": len(fleet_on_1.agents)}
    assert fleet_on_1.wait_for_version("2.0", 30)
    shown = api.rollout(created["id"])
    passed = [d for d in shown["decisions"] if d["kind"] == "gate_passed"]
    assert len(passed) == 2
    psi = next(r for r in passed[0]["figures"]["report"]["results"] if r["name"] == "class_shift_psi")
    assert psi["verdict"] == "passed" and psi["observed"] < 0.1
    assert api.dispatches(created["id"]) == dict.fromkeys(fleet_on_1.device_ids, 1)


def test_shifted_outputs_trip_the_class_gate_and_roll_every_updated_device_back(
    coordinator: FixedPortCoordinator, fleet_on_1: SimulatedFleet, tmp_path: Path, digits_model_bytes: bytes
) -> None:
    client = coordinator.client()
    push_2(client, tmp_path, shifted_model(digits_model_bytes))
    api = Api(client)
    gates = {**QUICK_GATES, "max_js_divergence": 0.2}
    with Traffic(lambda: fleet_on_1.agents):
        rollout = api.create(
            waves=[{"count": 3, "bake_seconds": 3}, {"percent": 100, "bake_seconds": 3}],
            gates=gates,
            on_gate_failure="rollback",
        )
        wait_until(lambda: api.status(rollout["id"]) == "rolled_back", 90, "the rollout to roll back")
    shown = api.rollout(rollout["id"])
    failed = next(d for d in shown["decisions"] if d["kind"] == "gate_failed")
    results = {r["name"]: r for r in failed["figures"]["report"]["results"]}
    shift = [results[name] for name in ("class_shift_psi", "class_shift_js") if results[name]["verdict"] == "failed"]
    assert shift, failed["message"]
    assert all(r["observed"] > r["threshold"] for r in shift)
    assert fleet_on_1.wait_for_version("1.0", 30), "every device back on 1.0"
    touched = api.dispatches(rollout["id"])
    assert api.dispatches(rollout["id"], "rollback") == touched
    assert sum(touched.values()) == 3, "the second wave never started"


def test_latency_regression_trips_the_p95_gate_and_pauses(
    coordinator: FixedPortCoordinator, fleet_on_1: SimulatedFleet, tmp_path: Path, digits_model_bytes: bytes
) -> None:
    client = coordinator.client()
    push_2(client, tmp_path, slow_model(digits_model_bytes))
    api = Api(client)
    # Only the latency gate: the slow model answers like 1.0, but a slow cohort serves fewer requests, and the
    # class-shift statistics over a few dozen of them are noise this test is not about.
    gates = {**QUICK_GATES, "max_psi": None}
    with Traffic(lambda: fleet_on_1.agents):
        rollout = api.create(waves=[{"count": 2, "bake_seconds": 3}, {"percent": 100, "bake_seconds": 3}], gates=gates)
        wait_until(lambda: api.status(rollout["id"]) == "paused", 90, "the p95 gate to pause the rollout")
    shown = api.rollout(rollout["id"])
    failed = next(d for d in shown["decisions"] if d["kind"] == "gate_failed")
    p95 = next(r for r in failed["figures"]["report"]["results"] if r["name"] == "p95_latency_ratio")
    assert p95["verdict"] == "failed" and p95["observed"] > 10, p95
    assert shown["reason"] == "gate failed: p95_latency_ratio"
    assert len(fleet_on_1.running("2.0")) == 2, "the paused rollout went no further than its first wave"


@pytest.mark.parametrize("coordinator", ["mosquitto-sqlite", "embedded-sqlite", "mosquitto-postgres"], indirect=True)
def test_coordinator_killed_mid_rollout_resumes_and_updates_every_device_exactly_once(
    coordinator: FixedPortCoordinator, fleet_on_1: SimulatedFleet, tmp_path: Path, digits_model_bytes: bytes
) -> None:
    client = coordinator.client()
    push_2(client, tmp_path, digits_model_bytes)
    api = Api(client)
    rollout = api.create(waves=[{"percent": 100, "bake_seconds": 0}], gates=NO_GATES, max_concurrent_downloads=2)
    wait_until(lambda: sum(api.dispatches(rollout["id"]).values()) >= 2, 30, "the first dispatches")
    coordinator.kill()
    before = len(fleet_on_1.running("2.0"))
    time.sleep(1.0)
    client = coordinator.start()
    api = Api(client)
    wait_until(lambda: api.status(rollout["id"]) == "completed", 90, "the restarted coordinator to finish")
    assert before < len(fleet_on_1.device_ids), "the kill came too late to prove anything"
    assert fleet_on_1.wait_for_version("2.0", 30)
    decisions = api.rollout(rollout["id"])["decisions"]
    updated = Counter(d["figures"]["device_id"] for d in decisions if d["kind"] == "device_updated")
    assert updated == dict.fromkeys(fleet_on_1.device_ids, 1), "each device installed 2.0 once, none skipped"
    # A download cut by the kill (the artifact route died with the coordinator) is a failed attempt, retried
    # by design; the restart itself adds nothing: attempts = 1 + the retries the log explains.
    retries = Counter(d["figures"]["device_id"] for d in decisions if d["kind"] == "retry_scheduled")
    expected = {device_id: 1 + retries[device_id] for device_id in fleet_on_1.device_ids}
    assert api.dispatches(rollout["id"]) == expected
    generations = {d["id"]: d["desired_generation"] for d in client.devices()}
    assert generations == {device_id: 1 + n for device_id, n in expected.items()}, "one generation per attempt"


def test_late_joiner_matching_the_selector_receives_the_rollout(
    coordinator: FixedPortCoordinator,
    fleet_on_1: SimulatedFleet,
    topic_base: str,
    tmp_path: Path,
    digits_model_bytes: bytes,
) -> None:
    client = coordinator.client()
    push_2(client, tmp_path, digits_model_bytes)
    api = Api(client)
    rollout = api.create(waves=[{"percent": 100, "bake_seconds": 0}], gates=NO_GATES)
    wait_until(lambda: api.status(rollout["id"]) == "completed", 60, "the rollout to complete")
    late = start_fleet(client, topic_base, tmp_path / "late", 1, prefix="late")
    try:
        assert late.wait_for_version("2.0", 60), "the late joiner did not receive 2.0"
        joined = [d for d in api.rollout(rollout["id"])["decisions"] if d["kind"] == "device_joined"]
        assert [d["figures"]["device_id"] for d in joined] == late.device_ids
    finally:
        late.stop()


def test_pause_resume_promote_and_abort_with_rollback_from_the_cli(
    coordinator: FixedPortCoordinator, fleet_on_1: SimulatedFleet, tmp_path: Path, digits_model_bytes: bytes
) -> None:
    client = coordinator.client()
    push_2(client, tmp_path, digits_model_bytes)
    api = Api(client)
    rollout = api.create(
        waves=[{"count": 1, "bake_seconds": 600}, {"percent": 100, "bake_seconds": 600}], gates=NO_GATES
    )
    rid = str(rollout["id"])
    wait_until(lambda: api.status(rollout["id"]) == "baking", 60, "the first wave to bake")

    paused = cli(client, "pause", rid, "--reason", "maintenance window")
    assert paused["applied"] and paused["rollout"]["status"] == "paused"
    assert paused["rollout"]["reason"] == "maintenance window"
    assert cli(client, "status", rid)["status"] == "paused"
    assert cli(client, "resume", rid)["rollout"]["status"] == "baking"
    promoted = cli(client, "promote", rid)["rollout"]
    assert promoted["current_wave"] == 1 and promoted["status"] in {"running", "baking"}
    wait_until(lambda: len(fleet_on_1.running("2.0")) == len(fleet_on_1.agents), 60, "the second wave to install")

    aborted = cli(client, "abort", rid, "--rollback", "--reason", "changed our minds")
    assert aborted["rollout"]["status"] in {"rolling_back", "rolled_back"}
    wait_until(lambda: api.status(rollout["id"]) == "rolled_back", 60, "the rollback to finish")
    assert fleet_on_1.wait_for_version("1.0", 30)
    listed = cli(client, "list")
    assert [(r["id"], r["status"]) for r in listed["data"]] == [(rollout["id"], "rolled_back")]


def cli_text(client: ApiClient, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `edgefleet rollouts ...` as a person would (tables, not JSON), on a wide terminal."""
    exe = Path(sys.executable).parent / "edgefleet"
    env = {"EDGEFLEET_TOKEN": client.token or "", "PATH": "/usr/bin:/bin", "COLUMNS": "250"}
    command = [str(exe), "rollouts", *args, "--url", client.url]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)


def test_first_rollout_of_a_new_model_completes_with_live_traffic_on_absolute_gates(
    coordinator: FixedPortCoordinator, topic_base: str, tmp_path: Path, digits_model_path: Path
) -> None:
    """Devices run another model or none, so there is no control cohort: absolute limits judge the new model."""
    client = coordinator.client()
    client.push_model(digits_model_path, name="legacy", version="3.1")
    client.push_model(digits_model_path, name="ocr", version="1.0")
    fleet = start_fleet(client, topic_base, tmp_path / "fleet", 4, prefix="nm")
    try:
        wait_until(lambda: {d["id"] for d in client.devices()} >= set(fleet.device_ids), 30, "devices to enrol")
        client.deploy(model="legacy", version="3.1", device_ids=fleet.device_ids[:2])
        assert all(a.wait_for_model("3.1", 60) for a in fleet.agents[:2]), "two devices on another model"
        with Traffic(lambda: fleet.agents):
            created = cli(
                client,
                "create",
                "ocr:1.0",
                "--to",
                "group=ro",
                "--waves",
                "1,100%",
                "--bake",
                "2s",
                "--max-error-rate",
                "0.01",
                "--max-p95-ms",
                "100",  # generous: the machine is shared; the agents answer in about a millisecond
                "--min-samples",
                "20",
                "--max-data-wait",
                "60",
            )
            assert created["baseline"] == "absolute", "no --from: a new model is judged on absolute limits"
            changes = cli(client, "status", str(created["id"]), "--watch", "--interval", "0.5", "--timeout", "90")
        assert changes[-1]["status"] == "completed", changes
        assert fleet.wait_for_version("1.0", 30) and {a.active_model.name for a in fleet.agents} == {"ocr"}  # type: ignore[union-attr]
        decisions = Api(client).rollout(created["id"])["decisions"]
        passed = [d for d in decisions if d["kind"] == "gate_passed"]
        assert [d["figures"]["wave_number"] for d in passed] == [1, 2]
        for decision in passed:
            verdicts = {r["name"]: r["verdict"] for r in decision["figures"]["report"]["results"]}
            assert verdicts["error_rate"] == verdicts["p95_latency_ms"] == "passed", decision["message"]
            assert verdicts["class_shift_psi"] == verdicts["error_rate_increase"] == "not_applicable"
        assert not [d for d in decisions if d["kind"] in {"control_mismatch", "gates_waiting", "gate_inconclusive"}]
    finally:
        fleet.stop()


def test_partial_promotion_from_the_cli_starts_the_named_wave_and_shows_waves_from_one(
    coordinator: FixedPortCoordinator, fleet_on_1: SimulatedFleet, tmp_path: Path, digits_model_bytes: bytes
) -> None:
    client = coordinator.client()
    push_2(client, tmp_path, digits_model_bytes)
    api = Api(client)
    waves = [{"count": 1, "bake_seconds": 600}, {"count": 3, "bake_seconds": 600}, {"percent": 100, "bake_seconds": 0}]
    rollout = api.create(waves=waves, gates=NO_GATES)
    rid = str(rollout["id"])
    wait_until(lambda: api.status(rollout["id"]) == "baking", 60, "the first wave to bake")

    refused = cli_text(client, "promote", rid, "--to-percent", "10")
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.strip() == (
        f"error: rollout {rid}: cannot promote: no wave beyond the current one (1) stays within 10%: "
        "wave 2 reaches 37.5% (3 of 8 devices) (HTTP 409)"
    ), refused.stderr
    promoted = cli(client, "promote", rid, "--wave", "3")["rollout"]
    assert (promoted["current_wave"], promoted["current_wave_number"]) == (2, 3)
    wait_until(lambda: api.status(rollout["id"]) == "completed", 60, "waves 2 and 3 to install together")
    assert fleet_on_1.wait_for_version("2.0", 30)

    shown = cli_text(client, "status", rid)
    assert shown.returncode == 0, shown.stderr
    assert "wave 3/3, 8 devices" in shown.stdout
    waves_table, decisions_table = shown.stdout.split("last decisions")
    assert [line.split()[1] for line in waves_table.splitlines() if line.startswith("│ ")] == ["1", "2", "3"]
    assert "wave 3 installed (8 updated, 0 failed)" in decisions_table
    assert "wave 3 gates passed" in decisions_table
    assert not re.search(r"\bwave 0\b", shown.stdout)
    promoted_decision = next(d for d in api.rollout(rollout["id"])["decisions"] if d["kind"] == "wave_promoted")
    assert promoted_decision["message"].startswith("waves 1-2 promoted by ")
    assert promoted_decision["message"].endswith(
        "to wave 3: bakes and gates skipped, their devices install along with wave 3"
    )
    listed = cli_text(client, "list")
    assert re.search(rf"│ {rid} +│ digits:2.0 +│ completed +│ 3/3 ", listed.stdout), listed.stdout
