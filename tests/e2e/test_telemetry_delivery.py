"""Telemetry acknowledged end to end, proven by killing what carries it while real agents stream windows.

- the coordinator with its embedded broker (on a port of its own, the requested one taken), SIGKILLed mid-stream;
- an external Mosquitto without persistence, SIGKILLed mid-stream and started again on its port.

Either way every window the agents closed is stored exactly once, their outboxes empty, and no gap is reported.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from agent import Agent
from cloud.client import ApiClient
from simulators import CoordinatorProcess, FleetConfig, SimulatedFleet
from simulators.brokers import MosquittoProcess, mosquitto_binary
from tests.agent.conftest import install_model, model_spec
from tests.e2e.test_fleet_deploy import wait_until
from tests.e2e.test_restarts import occupied_port
from tests.services import free_port, unavailable

pytestmark = pytest.mark.e2e

ROW = np.random.default_rng(9).random((1, 64), dtype=np.float32)
WINDOWS = 60  # per device


def stored_seqs(client: ApiClient, device_id: str) -> list[int]:
    return [w["seq"] for w in client.telemetry(device_id)]


@contextmanager
def streaming_agents(client: ApiClient, root: Path, topic_base: str, model: bytes) -> Iterator[list[Agent]]:
    """Two enrolled agents serving a model, resending unconfirmed windows every second; stopped afterwards."""
    config = FleetConfig(
        devices=2,
        data_root=root,
        coordinator_url=client.url,
        api_token=client.token,
        topic_base=topic_base,
        id_prefix="kill",
        http=False,
        telemetry_interval_s=3600,
    )
    fleet = SimulatedFleet(config)
    fleet.enrol()
    spec = model_spec("digits", "1.0", model)
    agents = []
    for member in fleet.agents:
        install_model(member.config.data_dir, spec, model)  # enrolled on a fresh data dir: seqs start at 0
        agents.append(Agent(member.config.model_copy(update={"telemetry_resend_s": 1.0})))
    for agent in agents:
        agent.start()
    try:
        ids = {a.config.device_id for a in agents}
        wait_until(lambda: {d["id"] for d in client.devices() if d["status"] == "online"} >= ids, 30, "online")
        yield agents
    finally:
        for agent in agents:
            agent.stop()


def stream_through(agents: Sequence[Agent], client: ApiClient, fault: Callable[[], ApiClient]) -> None:
    """Each agent closes WINDOWS windows of one inference; `fault` strikes mid-stream and returns the client to
    use afterwards. Then every window must be stored exactly once, confirmed to its agent, with no gap."""

    def stream(agent: Agent) -> None:
        for _ in range(WINDOWS):
            agent.infer({"input": ROW})
            agent.flush_telemetry()
            time.sleep(0.05)

    streams = [threading.Thread(target=stream, args=(a,)) for a in agents]
    for thread in streams:
        thread.start()
    wait_until(lambda: len(stored_seqs(client, agents[0].config.device_id)) >= 10, 30, "telemetry flowing")
    midstream = any(thread.is_alive() for thread in streams)
    client = fault()
    assert midstream, "the fault came after the stream ended: it proves nothing"
    for thread in streams:
        thread.join(60)
    for agent in agents:
        wait_until(lambda a=agent: not a.telemetry_unconfirmed, 60, f"{agent.config.device_id} confirmed")
        sent = agent.telemetry_sent_seqs
        assert sorted(sent) == list(range(WINDOWS))
        assert stored_seqs(client, agent.config.device_id) == sorted(sent), "a window lost or stored twice"
    for line in client.fleet_summary()["devices"]:
        assert line["inference_count"] == WINDOWS and line["telemetry_gaps"] == 0, line


def test_windows_in_flight_when_the_coordinator_is_killed_are_stored_once(
    tmp_path: Path, topic_base: str, digits_model_bytes: bytes
) -> None:
    with occupied_port() as busy:  # the port asked for is taken: the embedded broker picks, and keeps, another
        settings = tmp_path / "coordinator.toml"
        settings.write_text(f"embedded_broker_port = {busy}\ntelemetry_gap_grace_s = 2\n")
        process = CoordinatorProcess(
            tmp_path / "coordinator",
            topic_base=topic_base,
            extra_args=("--config", str(settings), "--port", str(free_port())),
        )
        client = process.start()
        try:
            with streaming_agents(client, tmp_path / "fleet", topic_base, digits_model_bytes) as agents:

                def kill_coordinator() -> ApiClient:
                    process.kill()  # the coordinator and its broker die mid-stream
                    time.sleep(1.0)
                    return process.start()

                stream_through(agents, client, kill_coordinator)
        finally:
            process.stop()


def test_windows_in_flight_when_mosquitto_is_killed_are_stored_once(
    tmp_path: Path, topic_base: str, digits_model_bytes: bytes
) -> None:
    data_dir = tmp_path / "coordinator"
    if mosquitto_binary() is None:
        unavailable("Mosquitto is not installed (apt-get install mosquitto); this test kills one")
    broker = MosquittoProcess(tmp_path / "broker", data_dir, topic_base)  # no persistence
    broker.start()
    process = CoordinatorProcess(
        data_dir, mqtt_url=broker.url, topic_base=topic_base, extra_args=broker.coordinator_args
    )
    try:
        client = process.start()
        with streaming_agents(client, tmp_path / "fleet", topic_base, digits_model_bytes) as agents:

            def kill_broker() -> ApiClient:
                broker.kill()  # no persistence: what it held for the coordinator's session is gone with it
                time.sleep(1.0)
                broker.start()
                return client

            stream_through(agents, client, kill_broker)
    finally:
        process.stop()
        broker.stop()
