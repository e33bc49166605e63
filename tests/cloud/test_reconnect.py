"""A broker restart loses retained messages; the coordinator refills every desired state when it reconnects."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cloud.app import create_app
from cloud.broker import EmbeddedBroker
from cloud.settings import Settings
from protocol.topics import Topics
from tests.cloud.fleet_helpers import api_for
from tests.cloud.mqtt_helpers import connected_client
from tests.cloud.test_bridge import stats, wait_until
from tests.services import free_port, mosquitto_binary, unavailable, wait_for_port


class RestartableBroker:
    """A broker on a fixed port that can be stopped and started again (in-memory retained state is lost)."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.port = free_port()
        self.workdir = workdir
        self._embedded: EmbeddedBroker | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.kind == "amqtt":
            self._embedded = EmbeddedBroker("127.0.0.1", self.port, allow_anonymous=True, fallback_to_free_port=False)
            self._embedded.start()
            return
        binary = mosquitto_binary()
        if binary is None:
            unavailable("Mosquitto is not installed")
        assert binary is not None
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self._proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_for_port("127.0.0.1", self.port):
            unavailable(f"Mosquitto did not start on {self.port}")

    def stop(self) -> None:
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
            self._proc = None


@pytest.fixture(params=["mosquitto", "amqtt"])
def restartable(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RestartableBroker]:
    broker = RestartableBroker(request.param, tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_republishes_desired_states_after_the_broker_lost_them(
    restartable: RestartableBroker, topic_base: str, tmp_path: Path, digits_model_bytes: bytes
) -> None:
    settings = Settings(data_dir=tmp_path / "c", mqtt_url=restartable.url, topic_base=topic_base, port=8080)
    app = create_app(settings)
    with TestClient(app) as client:
        api = api_for(app, client)
        api.push("digits", "1.0", digits_model_bytes)
        api.report("edge-1", tags={"site": "lab"})
        body = {"model": "digits", "version": "1.0", "target": {"device_ids": ["edge-1"]}}
        assert client.post("/api/v1/deployments", json=body, headers=api.auth).status_code == 201

        restartable.stop()
        wait_until(lambda: not client.get("/api/v1/stats").json()["mqtt_connected"], what="bridge noticed")
        assert client.get("/healthz").status_code == 503
        restartable.start()
        wait_until(lambda: stats(api)["connects"] >= 2, timeout=20, what="bridge reconnected")

        with connected_client(restartable.url, Topics(topic_base).desired("edge-1")) as (_, received):
            message = received.wait_for(lambda m: True)
        assert message.retain and json.loads(message.payload)["generation"] == 1
        wait_until(lambda: client.get("/healthz").status_code == 200, what="ready again")
