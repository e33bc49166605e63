"""A broker that moved is found again: the agent asks the coordinator where it is after a few failed connects."""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from agent.identity import load_identity
from protocol.mqtt import parse_mqtt_url
from simulators import CoordinatorProcess
from tests.e2e.clients import enrol_device
from tests.e2e.test_fleet_deploy import wait_until
from tests.e2e.test_identity import agent_for
from tests.services import run_fleet_broker

pytestmark = pytest.mark.e2e

REDISCOVER_AFTER = 2
# Connect attempts are 1-2 s apart (reconnect_min/max_s): the agent asks after a few seconds; room for a slow CI.
RECONNECT_BOUND_S = 30.0


def broker_moved_events(data_dir: Path) -> list[str]:
    """The `broker.moved` events the coordinator stored (read from its SQLite database)."""
    with sqlite3.connect(data_dir / "edgefleet.db") as db:
        rows = db.execute("SELECT message FROM device_event WHERE kind = 'broker.moved'").fetchall()
    return [row[0] for row in rows]


@pytest.mark.parametrize("kind", ["mosquitto", "amqtt"])
def test_agent_finds_a_broker_that_moved_to_another_port(
    kind: str, topic_base: str, coordinator_data_dir: Path, tmp_path: Path
) -> None:
    with ExitStack() as first_broker:
        old = first_broker.enter_context(
            run_fleet_broker(kind, tmp_path / "broker-1", coordinator_data_dir, topic_base)
        )
        first = CoordinatorProcess(
            coordinator_data_dir, mqtt_url=old.url, topic_base=topic_base, extra_args=old.coordinator_args
        )
        api = first.start()
        identity = enrol_device(api, tmp_path / "devices", "wanderer")
        agent = agent_for(identity, tmp_path, broker_rediscover_after=REDISCOVER_AFTER)
        agent.start()
        wait_until(lambda: api.device("wanderer")["status"] == "online", 30, "the agent on the first broker")
        http_port = api.url.rsplit(":", 1)[1]
        assert first.stop() == 0
    # The first broker is gone; the fleet's broker now runs on another port (same fleet PKI).
    try:
        with run_fleet_broker(kind, tmp_path / "broker-2", coordinator_data_dir, topic_base) as moved:
            assert parse_mqtt_url(moved.url).port != parse_mqtt_url(old.url).port
            second = CoordinatorProcess(  # same HTTP address: the one the device enrolled with
                coordinator_data_dir,
                mqtt_url=moved.url,
                topic_base=topic_base,
                extra_args=(*moved.coordinator_args, "--port", http_port),
            )
            api = second.start()
            started = time.monotonic()
            try:
                transport = agent._transport
                assert transport is not None
                wait_until(
                    lambda: transport.connected and transport.address.port == parse_mqtt_url(moved.url).port,
                    RECONNECT_BOUND_S,
                    "the agent to ask the coordinator where the broker went, and connect there",
                )
                reconnect_s = time.monotonic() - started
                wait_until(lambda: api.device("wanderer")["status"] == "online", 30, "the device online again")
                assert agent.broker_address == parse_mqtt_url(moved.url)
                ports = parse_mqtt_url(old.url).port, parse_mqtt_url(moved.url).port
                moved_note = f"broker moved from 127.0.0.1:{ports[0]} to 127.0.0.1:{ports[1]}"
                wait_until(
                    lambda: moved_note in broker_moved_events(coordinator_data_dir), 30, "the broker.moved event"
                )
                stored = load_identity(identity.directory.parent)
                assert stored is not None and stored.broker_url == moved.url, "the new URL is kept for restarts"
                assert json.loads((identity.directory / "identity.json").read_text())["broker_url"] == moved.url
                assert reconnect_s < RECONNECT_BOUND_S
            finally:
                assert second.stop() == 0
    finally:
        agent.stop()
