"""Fixtures for agent tests: an artifact HTTP server, a recording MQTT observer and started agents."""

from __future__ import annotations

import functools
import hashlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent import Agent, AgentConfig
from agent.update import SlotStore
from protocol import (
    ArtifactRef,
    DesiredState,
    DeviceEvent,
    Message,
    ModelSpec,
    ReportedState,
    TelemetryWindow,
    TensorSpec,
    Topics,
    decode,
    encode,
)
from simulators.faults import FaultyArtifactServer

DIGITS_INPUTS = [TensorSpec(name="input", datatype="FP32", shape=[-1, 64])]
DIGITS_OUTPUTS = [TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 10])]


def model_spec(
    name: str, version: str, data: bytes, *, url: str = "http://127.0.0.1:9/unused", declared_sha256: str | None = None
) -> ModelSpec:
    """The spec a coordinator would send for `data` (digits tensors)."""
    digest = declared_sha256 or hashlib.sha256(data).hexdigest()
    return ModelSpec(
        name=name,
        version=version,
        artifact=ArtifactRef(url=url, sha256=digest, size=len(data)),
        inputs=DIGITS_INPUTS,
        outputs=DIGITS_OUTPUTS,
    )


def install_model(data_dir: Path, spec: ModelSpec, data: bytes, slot: str = "a") -> None:
    """Put a model into a data directory's active slot, as an earlier update would have left it."""
    source = data_dir / "incoming.onnx"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(data)
    slots = SlotStore(data_dir / "slots")
    slots.stage(slot, source, spec)
    slots.activate(slot)
    source.unlink()


class ArtifactServer:
    """Serves files from a directory over HTTP on 127.0.0.1 (like the coordinator's artifact store)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        handler = functools.partial(_QuietHandler, directory=str(root))
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> ArtifactServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def model(self, name: str, version: str, data: bytes, *, declared_sha256: str | None = None) -> ModelSpec:
        """Publish `data` as a file and return the spec a coordinator would send for it."""
        filename = f"{name}-{version}.onnx"
        (self.root / filename).write_bytes(data)
        return model_spec(name, version, data, url=f"{self.url}/{filename}", declared_sha256=declared_sha256)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class Observer:
    """A paho client on the test's topic base that records every message and can publish as the coordinator."""

    def __init__(self, broker_url: str, topics: Topics) -> None:
        self.topics = topics
        self._cond = threading.Condition()
        self.messages: list[tuple[str, bytes, bool]] = []
        parts = urlsplit(broker_url)
        self._client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex)
        self._client.on_message = self._on_message
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *_a: subscribed.set()
        self._client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=30)
        self._client.loop_start()
        self._client.subscribe(f"{topics.base}/#", qos=1)
        assert subscribed.wait(10), "observer could not subscribe"

    def _on_message(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain)))
            self._cond.notify_all()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        self._client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def desire(self, device_id: str, generation: int, model: ModelSpec | None) -> None:
        """Publish a desired state retained, as the coordinator does."""
        state = DesiredState(device_id=device_id, generation=generation, model=model)
        self.publish(self.topics.desired(device_id), encode(state))

    def all(self, topic: str, kind: type[Message]) -> list[Any]:
        with self._cond:
            return [decode(kind, p) for t, p, _ in self.messages if t == topic and p]

    def wait_for(self, topic: str, kind: type[Message], predicate: Callable[[Any], bool], timeout: float = 20.0) -> Any:
        """The first `kind` message on `topic` matching `predicate`; AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, payload, _ in self.messages:
                    if t == topic and payload:
                        message = decode(kind, payload)
                        if predicate(message):
                            return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [decode(kind, p) for t, p, _ in self.messages if t == topic and p]
                    raise AssertionError(f"no matching {kind.__name__} on {topic} within {timeout}s; saw {seen}")
                self._cond.wait(remaining)

    def reported(self, device_id: str, predicate: Callable[[ReportedState], bool], timeout: float = 20.0) -> Any:
        return self.wait_for(self.topics.reported(device_id), ReportedState, predicate, timeout)

    def event(self, device_id: str, predicate: Callable[[DeviceEvent], bool], timeout: float = 20.0) -> Any:
        return self.wait_for(self.topics.events(device_id), DeviceEvent, predicate, timeout)

    def telemetry(self, device_id: str) -> list[TelemetryWindow]:
        return self.all(self.topics.telemetry(device_id), TelemetryWindow)


@pytest.fixture
def artifacts(tmp_path: Path) -> Iterator[ArtifactServer]:
    root = tmp_path / "artifacts"
    root.mkdir()
    with ArtifactServer(root) as server:
        yield server


@pytest.fixture
def server() -> Iterator[FaultyArtifactServer]:
    """An artifact server that can drop, truncate, corrupt and slow down its files (`simulators.faults`)."""
    with FaultyArtifactServer() as srv:
        yield srv


@pytest.fixture
def observer(broker_url: str, topic_base: str) -> Iterator[Observer]:
    obs = Observer(broker_url, Topics(topic_base))
    yield obs
    obs.close()


AgentFactory = Callable[..., Agent]


@pytest.fixture
def make_agent(broker_url: str, topic_base: str, tmp_path: Path) -> Iterator[AgentFactory]:
    """Build (not start) agents on the test's broker and topic base; every one is stopped afterwards."""
    made: list[Agent] = []

    def factory(device_id: str = "dev-1", **overrides: Any) -> Agent:
        settings: dict[str, Any] = {
            "device_id": device_id,
            "data_dir": tmp_path / "agents" / device_id,
            "mqtt_url": broker_url,
            "topic_base": topic_base,
            "http_port": None,
            "telemetry_interval_s": 3600.0,
            "download_timeout_s": 10.0,
            "commit_after_s": 0.3,  # a short trial after each switch keeps the tests fast
        }
        settings.update(overrides)
        agent = Agent(AgentConfig(**settings))
        made.append(agent)
        return agent

    yield factory
    for agent in made:
        agent.stop()
