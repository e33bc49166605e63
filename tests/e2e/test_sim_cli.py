"""`edgefleet sim` runs a fleet against any coordinator, split over processes when asked, with steady traffic
of held-out digits, tags of the operator's choosing and drift on the cohorts it names."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud.client import ApiClient
from cloud.rollouts import RolloutPlan, assign_waves
from cloud.rollouts.service import engine_id
from simulators import FleetConfig, PacedTraffic, SimulatedFleet
from tests.e2e.test_fleet_deploy import online_ids, wait_until
from tests.services import FleetBroker, run_fleet_broker

EDGEFLEET = Path(sys.executable).parent / "edgefleet"

pytestmark = pytest.mark.e2e


@pytest.fixture(params=["mosquitto"])
def fleet_broker(
    request: pytest.FixtureRequest, coordinator_data_dir: Path, topic_base: str, tmp_path: Path
) -> Iterator[FleetBroker]:
    """One broker is enough here: what is tested is the split over processes."""
    with run_fleet_broker(request.param, tmp_path / "broker", coordinator_data_dir, topic_base) as broker:
        yield broker


def test_sim_splits_a_fleet_over_processes_with_distinct_identities(coordinator: ApiClient, tmp_path: Path) -> None:
    edgefleet = Path(sys.executable).parent / "edgefleet"
    command = [
        str(edgefleet),
        "sim",
        "--devices",
        "6",
        "--processes",
        "2",
        "--coordinator",
        coordinator.url,
        "--token",
        str(coordinator.token),
        "--prefix",
        "split",
        "--no-http",
        "--rps",
        "0",
        "--data-dir",
        str(tmp_path / "fleet"),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wanted = {f"split-{i:04d}" for i in range(6)}
        wait_until(lambda: wanted <= online_ids(coordinator), 60, "six devices from two processes to enrol")
        devices = {d["id"]: d for d in coordinator.devices() if d["id"] in wanted}
        assert {d["tags"]["fleet"] for d in devices.values()} == {"split"}
        assert sum(d["tags"]["ring"] == "canary" for d in devices.values()) == 1, "one canary in the whole fleet"
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "6 agents in 2 processes" in output
    wait_until(lambda: not (wanted & online_ids(coordinator)), 30, "the stopped fleet to go offline")


def test_paced_traffic_delivers_the_requested_rate_to_every_device(
    coordinator: ApiClient, topic_base: str, tmp_path: Path, digits_model_path: Path
) -> None:
    coordinator.push_model(digits_model_path, name="digits", version="1.0")
    config = FleetConfig(
        devices=3,
        data_root=tmp_path / "fleet",
        coordinator_url=coordinator.url,
        api_token=coordinator.token,
        topic_base=topic_base,
        id_prefix="paced",
    )
    rps, seconds = 20.0, 4.0
    with SimulatedFleet(config) as fleet:
        wait_until(lambda: set(fleet.device_ids) <= online_ids(coordinator), 30, "three devices to enrol")
        coordinator.deploy(model="digits", version="1.0", tags={"fleet": "paced"})
        assert fleet.wait_for_version("1.0", 60), "the fleet did not converge on 1.0"
        traffic = PacedTraffic(fleet.agents, rps)  # over each agent's local HTTP endpoint
        started = time.monotonic()
        with traffic:
            time.sleep(seconds)
        elapsed = time.monotonic() - started
        stats = traffic.stats()
        expected = rps * elapsed
        for device_id, device in stats.items():
            assert device.errors == 0 and device.idle == 0, device
            # Generous: a shared, noisy machine. The old loop delivered about a fifth of what was asked.
            assert abs(device.sent - expected) <= 0.25 * expected, (device_id, device.sent, expected)
            assert device.accuracy > 0.8, "real digits, answered by the real model"
        fleet.flush_telemetry()

        def counted() -> dict[str, int]:
            return {d["device_id"]: d["inference_count"] for d in coordinator.fleet_summary()["devices"]}

        sent = {device_id: device.sent for device_id, device in stats.items()}
        wait_until(lambda: counted() == sent, 30, f"the coordinator to count what was sent: {sent}")


@contextlib.contextmanager
def sim(coordinator: ApiClient, data_dir: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """`edgefleet sim ... ARGS` against the coordinator until the block ends (SIGTERM, then a clean exit)."""
    command = [
        str(EDGEFLEET),
        "sim",
        "--coordinator",
        coordinator.url,
        "--token",
        str(coordinator.token),
        "--no-http",
        "--telemetry-interval",
        "1",
        "--data-dir",
        str(data_dir),
        *args,
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output


def first_wave_device(rollout_number: int, device_ids: list[str], plan: dict[str, Any]) -> str:
    """The device the coordinator's `rollout_number`-th rollout of `plan` takes in its first wave."""
    waves = assign_waves(RolloutPlan.model_validate(plan), engine_id(rollout_number), device_ids)
    (device,) = [d for d, wave in waves.items() if wave == 0]
    return device


def test_sim_tags_its_devices_and_drift_trips_the_class_gate_on_the_drifted_cohort_only(
    coordinator: ApiClient, tmp_path: Path, digits_model_bytes: bytes
) -> None:
    """Two fleets, two models, one rollout each at once: the rollout whose canary sees rotated digits pauses on a
    class shift; the one whose devices all see clean digits completes."""
    for model in ("left", "right"):
        for version in ("1.0", "2.0"):
            path = tmp_path / f"{model}-{version}.onnx"
            path.write_bytes(digits_model_bytes)
            coordinator.push_model(path, name=model, version=version)

    def plan(model: str) -> dict[str, Any]:
        gates = {"max_psi": 0.25, "max_error_rate_increase": None, "max_p95_latency_ratio": None}
        return {
            "model": model,
            "version": "2.0",
            "previous_version": "1.0",
            "selector": {"tags": {"half": model}},
            "waves": [{"count": 1, "bake_seconds": 5}, {"percent": 100, "bake_seconds": 0}],
            "gates": gates | {"min_class_samples": 300},
        }

    # The right rollout will be the coordinator's second: rotate the digits of the device it takes first.
    canary = first_wave_device(2, [f"right-{i:04d}" for i in range(3)], plan("right"))
    site = f"site-{int(canary[-4:]) % 3}"  # the simulator's site tags: site-(index mod 3)
    left_args = ("--devices", "3", "--prefix", "left", "--tag", "half=left", "--tag", "team=vision", "--rps", "40")
    right_args = ("--devices", "3", "--prefix", "right", "--tag", "half=right", "--rps", "40")
    with (
        sim(coordinator, tmp_path / "left", *left_args),
        sim(coordinator, tmp_path / "right", *right_args, "--drift", f"rotate:site={site}"),
    ):
        wanted = {f"{half}-{i:04d}" for half in ("left", "right") for i in range(3)}
        wait_until(lambda: wanted <= online_ids(coordinator), 60, "six devices from two simulators to enrol")
        tags = {d["id"]: d["tags"] for d in coordinator.devices() if d["id"] in wanted}
        assert {tags[f"left-{i:04d}"]["team"] for i in range(3)} == {"vision"}, "--tag reaches the devices list"
        assert {tags[d]["half"] for d in wanted} == {"left", "right"}
        assert tags[canary]["site"] == site
        for half in ("left", "right"):
            coordinator.deploy(model=half, version="1.0", tags={"half": half})

        def serving(version: str) -> set[str]:
            return {d["id"] for d in coordinator.devices() if d.get("active_model_version") == version}

        wait_until(lambda: wanted <= serving("1.0"), 60, "both fleets to serve 1.0")
        left = coordinator.create_rollout(plan("left"))
        right = coordinator.create_rollout(plan("right"))
        assert right["id"] == 2, "the drifted canary was chosen for the coordinator's second rollout"

        def status(rollout: dict[str, Any]) -> str:
            return str(coordinator.rollout(rollout["id"])["status"])

        wait_until(lambda: status(right) == "paused", 90, "the drifted canary to trip the class-shift gate")
        wait_until(lambda: status(left) == "completed", 90, "the clean rollout to complete")

    shown = coordinator.get(f"/rollouts/{right['id']}", decisions=10_000)
    failed = next(d for d in shown["decisions"] if d["kind"] == "gate_failed")
    psi = next(r for r in failed["figures"]["report"]["results"] if r["name"] == "class_shift_psi")
    assert psi["verdict"] == "failed" and psi["observed"] > 0.25, psi
    assert [d["device_id"] for d in shown["devices"] if d["phase"] == "succeeded"] == [canary]
    clean = coordinator.get(f"/rollouts/{left['id']}", decisions=10_000)
    passed = next(d for d in clean["decisions"] if d["kind"] == "gate_passed")
    psi = next(r for r in passed["figures"]["report"]["results"] if r["name"] == "class_shift_psi")
    assert psi["verdict"] == "passed" and psi["observed"] < 0.25, psi
