"""Telemetry acknowledged end to end: real agents, a real Mosquitto, a coordinator on a real database. Whatever
stops between a publish and its storing (the coordinator, the broker, the agent), every window is stored once;
a window that is really gone is reported as a gap, and a deliberate seq jump is not."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlmodel import Session, col, select

from agent import Agent
from cloud.models import TelemetryRecord
from simulators.brokers import free_port, mosquitto_binary
from tests.agent.conftest import AgentFactory, install_model, model_spec
from tests.cloud.conftest import Api
from tests.cloud.fleet_helpers import enrol, live_coordinator, wait_until
from tests.services import unavailable, wait_for_port

pytestmark = pytest.mark.e2e

ROWS = np.random.default_rng(5).random((1, 64), dtype=np.float32)
GRACE_S = 1.0  # the coordinator's gap grace period in these tests
mosquitto_only = pytest.mark.parametrize("broker_url", ["mosquitto"], indirect=True)


class Mosquitto:
    """A Mosquitto of the test's own on a fixed port, without persistence: `crash()` forgets everything it held."""

    def __init__(self, workdir: Path) -> None:
        binary = mosquitto_binary()
        if binary is None:
            unavailable("Mosquitto is not installed (apt-get install mosquitto)")
        self.binary = str(binary)
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.conf = workdir / "mosquitto.conf"
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        assert wait_for_port("127.0.0.1", self.port, timeout=30), f"mosquitto did not start; see {self.log}"

    def crash(self) -> None:
        """SIGKILL: messages it acknowledged and had not delivered are gone."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def own_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "own-mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.crash()


@contextmanager
def coordinator(tmp_path: Path, mqtt_url: str, topic_base: str) -> Iterator[Api]:
    """The test's coordinator (the same data directory, so the same broker session, every time), dev-1 enrolled."""
    with live_coordinator(tmp_path, mqtt_url=mqtt_url, topic_base=topic_base, telemetry_gap_grace_s=GRACE_S) as api:
        if api.client.get("/api/v1/devices/dev-1", headers=api.auth).status_code == 404:
            enrol(api.coordinator, "dev-1")
        yield api


def stored(api: Api) -> list[tuple[int, int]]:
    """(seq, inference count) of dev-1's stored windows, by seq."""
    with Session(api.coordinator.engine) as session:
        statement = select(TelemetryRecord.seq, TelemetryRecord.inference_count).where(
            TelemetryRecord.device_id == "dev-1"
        )
        return [(int(s), int(n)) for s, n in session.exec(statement.order_by(col(TelemetryRecord.seq)))]


def device(api: Api) -> dict[str, Any]:
    return dict(api.client.get("/api/v1/devices/dev-1", headers=api.auth).json())


def event_kinds(api: Api) -> list[str]:
    return [e["kind"] for e in api.client.get("/api/v1/devices/dev-1/events", headers=api.auth).json()["data"]]


def windows(agent: Agent, count: int, inferences: int = 1) -> None:
    """Close `count` windows of `inferences` inferences each."""
    for _ in range(count):
        for _ in range(inferences):
            agent.infer({"input": ROWS})
        agent.flush_telemetry()


def on_disk(data_dir: Path) -> list[int]:
    """Seqs in the agent's outbox."""
    return sorted(int(p.stem) for p in (data_dir / "telemetry" / "outbox").glob("*.json"))


@pytest.fixture
def data_dir(tmp_path: Path, digits_model_bytes: bytes) -> Path:
    """dev-1's data directory: a model installed, and a seq counter (a device that has sent telemetry before)."""
    path = tmp_path / "agents" / "dev-1"
    install_model(path, model_spec("digits", "1.0", digits_model_bytes), digits_model_bytes)
    (path / "telemetry-seq").write_text("0")
    return path


@mosquitto_only
def test_agent_restarted_with_unconfirmed_windows_resends_them(
    make_agent: AgentFactory, broker_url: str, topic_base: str, data_dir: Path, tmp_path: Path
) -> None:
    first = make_agent()
    first.start()
    windows(first, 4)  # the coordinator is down (it never subscribed): the broker delivers these to nobody
    first.stop()
    assert on_disk(data_dir) == [0, 1, 2, 3], "unconfirmed windows are not on disk"

    with coordinator(tmp_path, broker_url, topic_base) as api:
        again = make_agent()
        again.start()
        windows(again, 2, inferences=2)
        wait_until(lambda: len(stored(api)) == 6, what="six windows stored")
        wait_until(lambda: not again.telemetry_unconfirmed, what="every window confirmed")
        assert stored(api) == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 2), (5, 2)], "a window was lost or counted twice"
        assert on_disk(data_dir) == []
        assert device(api)["inference_count"] == 8 and device(api)["telemetry_gaps"]["count"] == 0


@mosquitto_only
def test_window_lost_in_transit_is_resent_until_acknowledged(
    make_agent: AgentFactory,
    own_mosquitto: Mosquitto,
    topic_base: str,
    data_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = make_agent(mqtt_url=own_mosquitto.url, telemetry_resend_s=1.0, reconnect_min_s=1, reconnect_max_s=1)
    with coordinator(tmp_path, own_mosquitto.url, topic_base) as api:
        agent.start()
        windows(agent, 3)
        wait_until(lambda: len(stored(api)) == 3 and not agent.telemetry_unconfirmed, what="three windows confirmed")
    # The coordinator is stopped: the broker acknowledges the next windows and queues them for its session...
    windows(agent, 3)
    wait_until(lambda: agent.telemetry_sent_seqs == [0, 1, 2, 3, 4, 5], what="three more windows published")
    time.sleep(0.5)  # their PUBACKs
    own_mosquitto.crash()  # ...and loses them with everything else it held
    own_mosquitto.start()
    caplog.set_level(logging.INFO, logger="agent.telemetry")
    with coordinator(tmp_path, own_mosquitto.url, topic_base) as api:
        windows(agent, 1)
        wait_until(lambda: len(stored(api)) == 7, timeout=30, what="the lost windows sent again and stored")
        wait_until(lambda: not agent.telemetry_unconfirmed, what="every window confirmed")
        assert stored(api) == [(seq, 1) for seq in range(7)], "a window was lost or counted twice"
        assert device(api)["telemetry_gaps"]["count"] == 0 and "telemetry.gap" not in event_kinds(api)
    assert any("unconfirmed windows again" in r.getMessage() for r in caplog.records), "stored without a resend?"


@mosquitto_only
def test_gap_is_reported_when_a_window_is_deliberately_dropped(
    make_agent: AgentFactory, broker_url: str, topic_base: str, data_dir: Path, tmp_path: Path
) -> None:
    first = make_agent()
    first.start()
    windows(first, 6)  # the coordinator is down: all six wait in the outbox
    first.stop()
    (data_dir / "telemetry" / "outbox" / f"{3:020d}.json").unlink()  # window 3 is gone for good

    with coordinator(tmp_path, broker_url, topic_base) as api:
        again = make_agent(telemetry_resend_s=0.5)
        again.start()
        wait_until(lambda: device(api)["telemetry_gaps"]["count"] == 1, timeout=20, what="the gap reported")
        assert device(api)["telemetry_gaps"] == {"count": 1, "windows": 1, "ranges": [[3, 3]]}
        assert [seq for seq, _ in stored(api)] == [0, 1, 2, 4, 5]
        wait_until(lambda: not again.telemetry_unconfirmed, what="the agent's outbox emptied past the gap")
        assert event_kinds(api).count("telemetry.gap") == 1
        again.stop()

        (data_dir / "telemetry-seq").unlink()  # the counter is lost: the next run jumps SEQ_MARGIN ahead
        third = make_agent()
        third.start()
        windows(third, 2)
        wait_until(lambda: len(stored(api)) == 7, what="the third run's windows stored")
        assert [seq for seq, _ in stored(api)][-2:] == third.telemetry_sent_seqs and third.telemetry_sent_seqs[0] > 1000
        wait_until(lambda: not third.telemetry_unconfirmed, what="the jump's windows confirmed")
        time.sleep(2 * GRACE_S)
        assert device(api)["telemetry_gaps"] == {"count": 1, "windows": 1, "ranges": [[3, 3]]}, "the jump is no gap"
        assert event_kinds(api).count("telemetry.gap") == 1


@mosquitto_only
def test_coordinator_shows_what_a_full_outbox_dropped(
    make_agent: AgentFactory, broker_url: str, topic_base: str, data_dir: Path, tmp_path: Path
) -> None:
    first = make_agent(telemetry_outbox_windows=3)
    first.start()
    windows(first, 5)  # the coordinator is down: the outbox keeps the newest three
    assert first.telemetry_dropped == 2
    first.stop()
    assert on_disk(data_dir) == [2, 3, 4]

    with coordinator(tmp_path, broker_url, topic_base) as api:
        again = make_agent(telemetry_outbox_windows=3)
        again.start()
        wait_until(lambda: device(api)["telemetry_gaps"]["count"] == 1, timeout=20, what="the gap reported")
        shown = device(api)
        assert shown["telemetry_dropped"] == 2 and shown["telemetry_gaps"]["ranges"] == [[0, 1]]
        assert "telemetry.dropped" in event_kinds(api)
        summary = api.client.get("/api/v1/fleet/summary", headers=api.auth).json()["devices"]
        assert [(d["telemetry_gaps"], d["telemetry_dropped"]) for d in summary] == [(1, 2)]
