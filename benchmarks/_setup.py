"""Shared setup for benchmarks: a broker and a desired state, on loopback."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from cloud.broker import EmbeddedBroker
from protocol import ArtifactRef, DesiredState, ModelSpec, TensorSpec, Topics, encode

TOPIC_BASE = "bench/edgefleet/v1"


@contextmanager
def embedded_broker() -> Iterator[str]:
    """The coordinator's embedded amqtt broker on a free port; yields its URL."""
    broker = EmbeddedBroker(host="127.0.0.1", port=0, allow_anonymous=True)
    broker.start()
    try:
        yield broker.url
    finally:
        broker.stop()


def publish_desired(broker_url: str, device_id: str, model_path: Path, artifact_url: str, version: str) -> None:
    """Publish a retained desired state for the digits model, as the coordinator would."""
    data = model_path.read_bytes()
    spec = ModelSpec(
        name="digits",
        version=version,
        artifact=ArtifactRef(url=artifact_url, sha256=hashlib.sha256(data).hexdigest(), size=len(data)),
        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 64])],
        outputs=[TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 10])],
    )
    message = DesiredState(device_id=device_id, generation=1, model=spec)
    host, port = broker_url.removeprefix("mqtt://").split(":")
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{time.time_ns()}")
    client.connect(host, int(port))
    client.loop_start()
    client.publish(Topics(TOPIC_BASE).desired(device_id), encode(message), qos=1, retain=True).wait_for_publish(10)
    client.loop_stop()
    client.disconnect()


def rss_kib(pid: int) -> int:
    """Resident set size of a process, in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")
