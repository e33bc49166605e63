"""`edgefleet sim` runs a fleet against any coordinator, split over processes when asked."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.client import ApiClient
from tests.e2e.test_fleet_deploy import online_ids, wait_until
from tests.services import FleetBroker, run_fleet_broker

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
