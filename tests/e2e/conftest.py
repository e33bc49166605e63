"""End-to-end fixtures: a real coordinator process on a real fleet broker, and fleets of real agents.

Each test gets its own broker (Mosquitto configured by `edgefleet broker mosquitto-config`, or the embedded
amqtt broker in a process of its own), admitting only certificates of the test coordinator's fleet CA.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.client import ApiClient
from simulators import CoordinatorProcess
from tests.services import FleetBroker, run_fleet_broker


@pytest.fixture
def coordinator_data_dir(tmp_path: Path) -> Path:
    """Where the `coordinator` fixture keeps its data (artifacts, database, token, fleet PKI)."""
    return tmp_path / "coordinator"


@pytest.fixture(params=["mosquitto", "amqtt"])
def fleet_broker(
    request: pytest.FixtureRequest, coordinator_data_dir: Path, topic_base: str, tmp_path: Path
) -> Iterator[FleetBroker]:
    """Each end-to-end test runs against Mosquitto and against the embedded amqtt broker, both with mTLS."""
    with run_fleet_broker(request.param, tmp_path / "broker", coordinator_data_dir, topic_base) as broker:
        yield broker


@pytest.fixture
def broker_url(fleet_broker: FleetBroker) -> str:
    """The fleet broker's URL (`mqtts://`)."""
    return fleet_broker.url


@pytest.fixture
def coordinator(fleet_broker: FleetBroker, topic_base: str, coordinator_data_dir: Path) -> Iterator[ApiClient]:
    """`edgefleet up` in its own process on the test's fleet broker and topic base."""
    process = CoordinatorProcess(
        coordinator_data_dir, mqtt_url=fleet_broker.url, topic_base=topic_base, extra_args=fleet_broker.coordinator_args
    )
    client = process.start()
    try:
        yield client
    finally:
        assert process.stop() == 0, f"coordinator did not shut down cleanly; see {coordinator_data_dir}"
