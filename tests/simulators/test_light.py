"""Light simulated devices against a real coordinator process and the fleet's Mosquitto (mTLS, ACL)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.client import ApiClient
from simulators import CoordinatorProcess
from simulators.light import LIGHT_AGENT_VERSION, LightFleet
from tests.services import run_fleet_mosquitto

pytestmark = pytest.mark.e2e

DEVICES = 50
NO_GATES = dict.fromkeys(["max_install_failure_rate", "max_error_rate_increase", "max_p95_latency_ratio", "max_psi"])
# What a real agent publishes on its events topic from its start to an update's end (`agent.daemon._on_transition`).
AGENT_EVENTS = [
    ("agent.started", None),
    ("update.started", "downloading"),
    ("update.progress", "verifying"),
    ("update.progress", "staging"),
    ("update.progress", "loading"),
    ("update.progress", "health_check"),
    ("update.progress", "shadow"),
    ("update.progress", "switching"),
    ("update.progress", "committing"),
    ("update.activated", "active"),
]


@pytest.fixture
def coordinator(tmp_path: Path, topic_base: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[ApiClient]:
    """`edgefleet up` on SQLite with the fleet's Mosquitto."""
    monkeypatch.setenv("EDGEFLEET_ROLLOUT_TICK_S", "0.2")
    data_dir = tmp_path / "coordinator"
    with run_fleet_mosquitto(tmp_path / "broker", data_dir, topic_base) as broker:
        process = CoordinatorProcess(
            data_dir, mqtt_url=broker.url, topic_base=topic_base, extra_args=broker.coordinator_args
        )
        client = process.start()
        try:
            yield client
        finally:
            process.stop()


def test_light_fleet_converges_on_a_rollout_with_one_download_each_and_agent_reports(
    coordinator: ApiClient, tmp_path: Path, digits_model_path: Path
) -> None:
    client = coordinator
    pushed = client.push_model(digits_model_path, name="digits", version="1.0")
    secret = client.post_json("/bootstrap-secrets", {"name": "light", "tags": {"fleet": "light"}})["secret"]
    fleet = LightFleet(
        coordinator_url=client.url, bootstrap_secret=secret, devices=DEVICES, data_root=tmp_path / "light", processes=2
    )
    fleet.start()
    try:
        assert {d["id"] for d in client.devices() if d["status"] == "online"} == set(fleet.device_ids)
        plan = {
            "model": "digits",
            "version": "1.0",
            "waves": [{"percent": 100, "bake_seconds": 0}],
            "gates": NO_GATES,
            "max_concurrent_downloads": DEVICES,
            "device_timeout_seconds": 120,
        }
        rollout = client.create_rollout(plan)
        deadline = time.monotonic() + 120
        while client.rollout(rollout["id"])["status"] != "completed":
            assert time.monotonic() < deadline, "the rollout did not complete in 120 s"
            time.sleep(0.2)
    finally:
        result = fleet.stop()
    assert sorted(result.devices) == fleet.device_ids
    size = digits_model_path.stat().st_size
    for figures in result.devices.values():
        assert figures["downloads"] == 1
        assert figures["bytes"] == size
        assert figures["phase"] == "active"
        # Every phase's event, as an agent; the reported state coalesced as an agent's (`agent.reporting`): `online`
        # on connect, `active` at once, and one in between if the download outlasted the report interval.
        assert figures["events_sent"] == len(AGENT_EVENTS)
        assert 2 <= figures["reports_sent"] <= 3
    sha256 = pushed.get("sha256") or client.model_version("digits", "1.0")["sha256"]
    for device in client.devices():
        assert (device["active_model_name"], device["active_model_version"]) == ("digits", "1.0")
        assert device["active_model_sha256"] == sha256
        assert device["update_phase"] == "active"
        assert device["reported_generation"] == device["desired_generation"]
        assert device["agent_version"] == LIGHT_AGENT_VERSION
        assert device["capabilities"]["runtimes"] == ["onnxruntime"]
        assert device["last_error_code"] is None
    events = client.device_events(fleet.device_ids[0])
    kinds = [(e["kind"], e.get("phase")) for e in sorted(events, key=lambda e: e["id"])]
    assert [k for k in kinds if k[0].startswith(("agent.", "update."))] == AGENT_EVENTS
