"""Telemetry exact through faults, with short windows: a broker restart while devices report, one device offline for
many windows, an agent restarted while offline.

Real parts: a Mosquitto of the module's own (mTLS, no persistence) that is stopped and started again, the real
coordinator (`edgefleet up`, SQLite) behind it, real enrolled agents serving the digits model in ONNX Runtime with a
window of `WINDOW_S`, and one device's connection relayed through a `simulators.faulty_link.FaultyLink` that is
cut. Every check is exact: stored seqs 0..N with no gap and none twice, inference counts summing to what was sent.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import Agent, AgentConfig
from cloud.client import ApiClient
from simulators import CoordinatorProcess, FleetConfig, SimulatedFleet
from simulators.brokers import MosquittoProcess, mosquitto_binary
from simulators.faulty_link import FaultyLink
from tests.agent.conftest import install_model, model_spec
from tests.e2e.test_fleet_deploy import wait_until
from tests.services import unavailable

pytestmark = pytest.mark.e2e

ROW = np.random.default_rng(13).random((1, 64), dtype=np.float32)
WINDOW_S = 0.25  # the agents' telemetry window
OFFLINE_WINDOWS = 20  # windows a device spends cut off, at least


@dataclass
class Site:
    """The module's broker and coordinator."""

    broker: MosquittoProcess
    client: ApiClient
    topic_base: str
    root: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A Mosquitto (no persistence) on a port of its own and a coordinator on it, for the whole module."""
    if mosquitto_binary() is None:
        unavailable("Mosquitto is not installed (apt-get install mosquitto); these tests restart one")
    root = tmp_path_factory.mktemp("faults")
    topic_base = f"f{uuid.uuid4().hex[:8]}/edgefleet/v1"
    data_dir = root / "coordinator"
    broker = MosquittoProcess(root / "broker", data_dir, topic_base)
    broker.start()
    process = CoordinatorProcess(
        data_dir, mqtt_url=broker.url, topic_base=topic_base, extra_args=broker.coordinator_args
    )
    try:
        yield Site(broker, process.start(), topic_base, root)
    finally:
        process.stop()
        broker.stop()


def device_configs(site: Site, prefix: str, devices: int, model: bytes) -> list[AgentConfig]:
    """Enrolled devices serving digits 1.0 with a short window, resending after 1 s, reconnecting within 0.5 s."""
    fleet = SimulatedFleet(
        FleetConfig(
            devices=devices,
            data_root=site.root / prefix,
            coordinator_url=site.client.url,
            api_token=site.client.token,
            topic_base=site.topic_base,
            id_prefix=prefix,
            http=False,
            telemetry_interval_s=WINDOW_S,
        )
    )
    fleet.enrol()
    spec = model_spec("digits", "1.0", model)
    configs = []
    for member in fleet.agents:
        install_model(member.config.data_dir, spec, model)  # a fresh data dir: seqs start at 0
        update = {"telemetry_resend_s": 1.0, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5}
        configs.append(member.config.model_copy(update=update))
    return configs


class Traffic:
    """Inferences on one agent every few milliseconds from a thread of its own, counted."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.agent.infer({"input": ROW})
            self.sent += 1

    def stop(self) -> int:
        """Stop sending; how many inferences were sent."""
        self._stop.set()
        self._thread.join(10)
        return self.sent


def stored(client: ApiClient, device_id: str) -> list[dict[str, Any]]:
    return client.telemetry(device_id)


def settle(client: ApiClient, agent: Agent, inferences: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Flush the agent; wait until its outbox is confirmed and the coordinator holds `inferences`; its windows."""
    agent.flush_telemetry()
    device_id = agent.config.device_id

    def done() -> bool:
        total = sum(w["inference_count"] for w in stored(client, device_id))
        return not agent.telemetry_unconfirmed and total >= inferences

    wait_until(done, timeout, f"{device_id}'s windows confirmed with {inferences} inferences")
    return stored(client, device_id)


def assert_exact(windows: list[dict[str, Any]], inferences: int, device_id: str) -> None:
    """Seqs 0..N, none missing, none twice; windows in seq order in time; inference counts summing to `inferences`."""
    seqs = [w["seq"] for w in windows]
    assert seqs == list(range(len(windows))), f"{device_id}: a window lost or stored twice: {seqs}"
    assert sum(w["inference_count"] for w in windows) == inferences, f"{device_id}: inferences lost or counted twice"
    for before, after in itertools.pairwise(windows):  # back to back within a run; later after a restart
        assert at(before["window_end"]) <= at(after["window_start"]), f"{device_id}: {before['seq']}.. out of order"


def gaps_of(client: ApiClient, device_ids: set[str]) -> dict[str, int]:
    return {
        d["device_id"]: d["telemetry_gaps"] for d in client.fleet_summary()["devices"] if d["device_id"] in device_ids
    }


def started(configs: list[AgentConfig], client: ApiClient) -> list[Agent]:
    agents = [Agent(config) for config in configs]
    for agent in agents:
        agent.start()
    ids = {a.config.device_id for a in agents}
    wait_until(lambda: {d["id"] for d in client.devices() if d["status"] == "online"} >= ids, 30, "devices online")
    return agents


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def run_for(seconds: float, until: Callable[[], bool] | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (until and until()):
        time.sleep(0.05)


# -- the scenarios -------------------------------------------------------------------------------------------


def test_broker_restart_while_three_devices_report_loses_and_duplicates_nothing(
    site: Site, digits_model_bytes: bytes
) -> None:
    agents = started(device_configs(site, "brk", 3, digits_model_bytes), site.client)
    try:
        traffic = [Traffic(agent) for agent in agents]
        run_for(1.5)
        site.broker.stop()  # no persistence: whatever it held in flight is gone with it
        run_for(1.0)
        site.broker.start()
        run_for(1.5)
        sent = [t.stop() for t in traffic]
        for agent, count in zip(agents, sent, strict=True):
            windows = settle(site.client, agent, count)
            assert len(windows) >= 12, "too few windows to prove anything"
            assert_exact(windows, count, agent.config.device_id)
            assert agent.telemetry_dropped == 0
        assert set(gaps_of(site.client, {a.config.device_id for a in agents}).values()) == {0}
    finally:
        for agent in agents:
            agent.stop()


def test_device_cut_off_for_many_windows_delivers_them_all_in_order_once(site: Site, digits_model_bytes: bytes) -> None:
    configs = device_configs(site, "cut", 2, digits_model_bytes)
    with FaultyLink("127.0.0.1", site.broker.port) as link:
        # Device 0 reaches the broker through the link; device 1 directly (it keeps reporting throughout).
        configs[0] = configs[0].model_copy(update={"mqtt_url": f"mqtts://127.0.0.1:{link.port}"})
        agents = started(configs, site.client)
        cut_off = agents[0]
        try:
            traffic = [Traffic(agent) for agent in agents]
            run_for(0.8)
            link.cut()
            cut_at = datetime.now(UTC)
            wait_until(lambda: link.refused > 0, 5, "the device trying to reconnect in vain")
            run_for(WINDOW_S * (OFFLINE_WINDOWS + 2))
            assert len(cut_off.telemetry_unconfirmed) >= OFFLINE_WINDOWS, "the windows of the spell wait on disk"
            link.restore()
            back_at = datetime.now(UTC)
            run_for(0.8)
            sent = [t.stop() for t in traffic]
            for agent, count in zip(agents, sent, strict=True):
                assert_exact(settle(site.client, agent, count), count, agent.config.device_id)
            spell = [w for w in stored(site.client, cut_off.config.device_id)
                     if at(w["window_start"]) >= cut_at and at(w["window_end"]) <= back_at]  # fmt: skip
            assert len(spell) >= OFFLINE_WINDOWS, f"only {len(spell)} windows closed while cut off"
            assert set(gaps_of(site.client, {a.config.device_id for a in agents}).values()) == {0}
        finally:
            for agent in agents:
                agent.stop()


def test_agent_restarted_while_offline_loses_nothing_it_buffered(site: Site, digits_model_bytes: bytes) -> None:
    (config,) = device_configs(site, "rst", 1, digits_model_bytes)
    with FaultyLink("127.0.0.1", site.broker.port) as link:
        config = config.model_copy(update={"mqtt_url": f"mqtts://127.0.0.1:{link.port}"})
        (agent,) = started([config], site.client)
        try:
            traffic = Traffic(agent)
            run_for(0.6)
            link.cut()
            run_for(WINDOW_S * 8)
            sent = traffic.stop()
            agent.stop()  # offline: its windows stay in the outbox on disk
            agent = Agent(config)
            agent.start()  # still offline
            traffic = Traffic(agent)
            run_for(WINDOW_S * 4)
            assert agent.telemetry_unconfirmed, "the restarted agent holds the buffered windows"
            link.restore()
            sent += traffic.stop()
            assert_exact(settle(site.client, agent, sent), sent, config.device_id)
            assert gaps_of(site.client, {config.device_id}) == {config.device_id: 0}
        finally:
            agent.stop()
