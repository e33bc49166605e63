"""MQTT clients as an attacker or a device would open them: with a device's certificate, the coordinator's, or none."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.identity import DeviceIdentity, enrol
from cloud.client import ApiClient


@dataclass
class Session:
    """A connected (or refused) client and what it received."""

    client: mqtt.Client
    refused: str | None = None
    messages: list[tuple[str, bytes, bool]] = field(default_factory=list)
    granted: list[int] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)

    def topics(self) -> list[str]:
        """Topics of the messages received so far."""
        return [topic for topic, _, _ in self.messages]


def enrol_device(api: ApiClient, root: Path, device_id: str, tags: dict[str, str] | None = None) -> DeviceIdentity:
    """Enrol `device_id` the way an operator and a device do: token from the API, key and CSR on the device."""
    token = api.post_json(f"/devices/{device_id}/enrolment-token", {"tags": tags or {}})["token"]
    return enrol(data_dir=root / device_id, coordinator_url=api.url, device_id=device_id, token=token)


def tls_for(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client TLS context trusting `ca`, presenting `cert`/`key` when given."""
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


@contextmanager
def mqtt_session(
    url: str,
    client_id: str,
    tls: ssl.SSLContext | None,
    *,
    subscribe: tuple[str, ...] = (),
    will: tuple[str, bytes] | None = None,
    clean_session: bool = True,
    timeout: float = 10.0,
) -> Iterator[Session]:
    """Connect (waiting for the CONNACK), subscribe, and yield; `Session.refused` says why a connect failed."""
    parts = urlsplit(url)
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session
    )
    if tls is not None:
        client.tls_set_context(tls)
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    session = Session(client)
    connected = threading.Event()

    def on_connect(_c: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        if getattr(reason, "is_failure", False):
            session.refused = str(reason)
        connected.set()

    def on_disconnect(_c: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        session.disconnected.set()
        if not connected.is_set():
            session.refused = session.refused or f"disconnected: {reason}"
            connected.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_message = lambda _c, _u, m: session.messages.append((m.topic, bytes(m.payload), bool(m.retain)))
    client.on_subscribe = lambda _c, _u, _mid, codes, _p: session.granted.extend(int(c.value) for c in codes)
    try:
        client.connect(parts.hostname or "127.0.0.1", parts.port or 8883, keepalive=30)
    except (OSError, ssl.SSLError) as exc:
        session.refused = f"{type(exc).__name__}: {exc}"
        yield session
        return
    client.loop_start()
    try:
        if not connected.wait(timeout):
            session.refused = "no CONNACK"
        for topic in subscribe if session.refused is None else ():
            client.subscribe(topic, qos=1)
        time.sleep(0.3 if subscribe else 0)
        yield session
    finally:
        client.disconnect()
        client.loop_stop()


def device_tls(identity: DeviceIdentity) -> ssl.SSLContext:
    """TLS presenting `identity`'s certificate, trusting the fleet CA."""
    return tls_for(identity.ca_path, identity.cert_path, identity.key_path)


def coordinator_tls(data_dir: Path) -> ssl.SSLContext:
    """TLS presenting the coordinator's broker certificate (from its data dir's PKI)."""
    pki = data_dir / "pki"
    return tls_for(pki / "ca.crt", pki / "coordinator.crt", pki / "coordinator.key")
