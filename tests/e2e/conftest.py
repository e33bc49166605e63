"""End-to-end fixtures: a real coordinator process on a real broker, and fleets of real agents."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.client import ApiClient
from simulators import CoordinatorProcess


@pytest.fixture
def coordinator(broker_url: str, topic_base: str, tmp_path: Path) -> Iterator[ApiClient]:
    """`edgefleet up` in its own process on the test's broker (Mosquitto or amqtt) and topic base."""
    process = CoordinatorProcess(tmp_path / "coordinator", mqtt_url=broker_url, topic_base=topic_base)
    client = process.start()
    try:
        yield client
    finally:
        assert process.stop() == 0, f"coordinator did not shut down cleanly; see {tmp_path / 'coordinator'}"


@pytest.fixture
def coordinator_data_dir(tmp_path: Path) -> Path:
    """Where the `coordinator` fixture keeps its data (artifacts, database, token)."""
    return tmp_path / "coordinator"
