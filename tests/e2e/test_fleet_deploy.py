"""A coordinator process, a real broker and a fleet of real agents: deploys converge and telemetry adds up."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cloud.client import ApiClient
from simulators import FleetConfig, SimulatedFleet, drive_inference
from tests.services import FleetBroker

pytestmark = pytest.mark.e2e


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def fleet_config(client: ApiClient, topic_base: str, root: Path, devices: int, prefix: str) -> FleetConfig:
    return FleetConfig(
        devices=devices,
        data_root=root,
        coordinator_url=client.url,
        api_token=client.token,
        topic_base=topic_base,
        id_prefix=prefix,
        telemetry_interval_s=3600,
    )


def online_ids(client: ApiClient) -> set[str]:
    return {d["id"] for d in client.devices() if d.get("status") == "online"}


def deployment_statuses(client: ApiClient, deployment_id: object) -> dict[str, str]:
    return {t["device_id"]: t["status"] for t in client.deployment(str(deployment_id))["targets"]}


def test_fleet_of_ten_converges_and_telemetry_counts_match_what_agents_sent(
    coordinator: ApiClient, topic_base: str, tmp_path: Path, digits_model_path: Path
) -> None:
    coordinator.push_model(digits_model_path, name="digits", version="1.0.0")
    with SimulatedFleet(fleet_config(coordinator, topic_base, tmp_path / "fleet", 10, "e2e")) as fleet:
        wait_until(lambda: set(fleet.device_ids) <= online_ids(coordinator), 30, "all devices to enrol")
        deployment = coordinator.deploy(model="digits", version="1.0.0", tags={"fleet": "e2e"})

        wait_until(
            lambda: set(deployment_statuses(coordinator, deployment["id"]).values()) == {"succeeded"},
            60,
            "every device to report 1.0.0 active",
        )
        assert all(a.active_model is not None and a.active_model.version == "1.0.0" for a in fleet.agents)

        traffic = drive_inference(fleet.agents, 25)
        assert sum(t.errors for t in traffic) == 0
        assert sum(t.correct for t in traffic) / sum(t.sent for t in traffic) > 0.9
        fleet.flush_telemetry()
        drive_inference(fleet.agents[:3], 5)  # a second window for some devices: counts must add across windows
        fleet.flush_telemetry()

        expected = {t.device_id: t.sent for t in traffic}
        for t in traffic[:3]:
            expected[t.device_id] += 5

        def counted() -> dict[str, int]:
            return {d["device_id"]: d["inference_count"] for d in coordinator.fleet_summary()["devices"]}

        wait_until(lambda: counted() == expected, 30, f"coordinator counts to equal {expected}")
        for device in coordinator.fleet_summary()["devices"]:
            assert device["model_version"] == "1.0.0"
            assert device["latency_p50_ms"] is not None and device["latency_p50_ms"] <= device["latency_p95_ms"]
        sent_windows = {a.config.device_id: a.telemetry_sent_seqs for a in fleet.agents}
        for device_id, seqs in sent_windows.items():
            stored = [w["seq"] for w in coordinator.telemetry(device_id)]
            assert sorted(stored) == sorted(seqs), f"{device_id}: stored {stored}, agent sent {seqs}"
            assert len(stored) == len(set(stored))


def test_device_offline_during_deploy_converges_after_reconnect(
    coordinator: ApiClient, topic_base: str, tmp_path: Path, digits_model_path: Path
) -> None:
    coordinator.push_model(digits_model_path, name="digits", version="2.0.0")
    config = fleet_config(coordinator, topic_base, tmp_path / "fleet", 3, "late")
    with SimulatedFleet(config) as fleet:
        wait_until(lambda: set(fleet.device_ids) <= online_ids(coordinator), 30, "all devices to enrol")
        sleeper = fleet.agents[2]
        sleeper.stop()
        sleeper_id = sleeper.config.device_id
        wait_until(lambda: sleeper_id not in online_ids(coordinator), 30, "the coordinator to see the device offline")

        deployment = coordinator.deploy(model="digits", version="2.0.0", tags={"fleet": "late"})
        wait_until(
            lambda: (
                [s for d, s in deployment_statuses(coordinator, deployment["id"]).items() if d != sleeper_id]
                == ["succeeded", "succeeded"]
            ),
            60,
            "the online devices to converge",
        )
        assert deployment_statuses(coordinator, deployment["id"])[sleeper_id] != "succeeded"

        from agent import Agent

        revived = Agent(sleeper.config)  # same identity and data dir: a device coming back
        fleet.agents[2] = revived
        revived.start()
        assert revived.wait_for_model("2.0.0", timeout=60), "the reconnected device did not converge"
        wait_until(
            lambda: deployment_statuses(coordinator, deployment["id"])[sleeper_id] == "succeeded",
            30,
            "the coordinator to record the late device's success",
        )


def test_telemetry_sent_while_coordinator_is_down_is_counted_after_restart(
    fleet_broker: FleetBroker, coordinator_data_dir: Path, topic_base: str, tmp_path: Path, digits_model_path: Path
) -> None:
    from simulators import CoordinatorProcess

    process = CoordinatorProcess(
        coordinator_data_dir, mqtt_url=fleet_broker.url, topic_base=topic_base, extra_args=fleet_broker.coordinator_args
    )
    client = process.start()
    try:
        client.push_model(digits_model_path, name="digits", version="1.0.0")
        with SimulatedFleet(fleet_config(client, topic_base, tmp_path / "fleet", 2, "gap")) as fleet:
            wait_until(lambda: set(fleet.device_ids) <= online_ids(client), 30, "devices to enrol")
            deployment = client.deploy(model="digits", version="1.0.0", tags={"fleet": "gap"})
            wait_until(
                lambda: set(deployment_statuses(client, deployment["id"]).values()) == {"succeeded"},
                60,
                "the fleet to converge",
            )
            assert process.stop() == 0

            traffic = drive_inference(fleet.agents, 10)  # the coordinator is down: windows wait in the broker
            fleet.flush_telemetry()
            client = process.start()

            expected = {t.device_id: t.sent for t in traffic}
            wait_until(
                lambda: {d["device_id"]: d["inference_count"] for d in client.fleet_summary()["devices"]} == expected,
                30,
                f"counts {expected} after the coordinator restarted",
            )
    finally:
        process.stop()
