"""The cost of device identity on the broker: Mosquitto with mTLS and per-device ACLs against plain TCP, one run.

(a) telemetry throughput: one device publishes N telemetry windows (QoS 1, its own topic, the real protocol
    encoding) while the coordinator's identity receives them on `{base}/devices/+/telemetry`; messages/s from
    the first publish to the last delivery;
(b) connect time: median of K connects of the device (TCP, TLS handshake with client certificate, CONNACK).

Both against two Mosquitto processes started here: one plain (anonymous, no ACL), one configured by
`edgefleet broker mosquitto-config` (the fleet's). Prints the figures and the ratios TLS / plain.

    python benchmarks/bench_broker_tls.py [--messages 20000] [--connects 50]
"""

from __future__ import annotations

import argparse
import json
import ssl
import statistics
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from cloud.pki import FleetPki
from protocol import Channel, TelemetryWindow, Topics, encode, utcnow
from simulators.brokers import FleetBroker, fleet_broker, plain_mosquitto

BASE = "bench/tls/v1"
DEVICE = "bench-dev"


def device_identity(pki: FleetPki, directory: Path) -> tuple[Path, Path]:
    """A device certificate from the fleet CA over a key made here (setup, not measured)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    issued = pki.issue_device_certificate(DEVICE, csr.public_bytes(serialization.Encoding.PEM).decode(), days=1)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "device.crt").write_text(issued.pem)
    encoding, fmt = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    (directory / "device.key").write_bytes(key.private_bytes(encoding, fmt, serialization.NoEncryption()))
    return directory / "device.crt", directory / "device.key"


def client(url: str, client_id: str, tls: ssl.SSLContext | None) -> mqtt.Client:
    """A connected paho client (blocks until CONNACK)."""
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    if tls is not None:
        c.tls_set_context(tls)
    host, port = url.split("://")[1].split(":")
    connected = threading.Event()
    c.on_connect = lambda *_: connected.set()
    c.connect(host, int(port))
    c.loop_start()
    assert connected.wait(10), f"no CONNACK from {url}"
    return c


def throughput(url: str, device_tls: ssl.SSLContext | None, reader_tls: ssl.SSLContext | None, n: int) -> float:
    """Messages/s of `n` QoS 1 telemetry windows from the device to the coordinator's subscription."""
    topics = Topics(BASE)
    got = 0
    done = threading.Event()

    def on_message(*_: object) -> None:
        nonlocal got
        got += 1
        if got >= n:
            done.set()

    reader = client(url, "edgefleet:coordinator" if reader_tls else "reader", reader_tls)
    reader.on_message = on_message
    reader.subscribe(topics.all_devices(Channel.TELEMETRY), qos=1)
    time.sleep(0.3)
    device = client(url, DEVICE, device_tls)
    now = utcnow()
    payload = encode(TelemetryWindow(device_id=DEVICE, seq=1, window_start=now, window_end=now, inference_count=10,
                                     error_count=0, latency_histogram=[1] * 28, class_counts={"3": 10}))  # fmt: skip
    started = time.perf_counter()
    for _ in range(n):
        device.publish(topics.telemetry(DEVICE), payload, qos=1)
    assert done.wait(300), f"only {got} of {n} delivered"
    elapsed = time.perf_counter() - started
    for c in (device, reader):
        c.disconnect()
        c.loop_stop()
    return n / elapsed


def connect_ms(url: str, tls: ssl.SSLContext | None, k: int) -> float:
    """Median milliseconds from `connect` to CONNACK over `k` fresh connections of the device."""
    times = []
    for _ in range(k):
        started = time.perf_counter()
        c = client(url, DEVICE, tls)
        times.append((time.perf_counter() - started) * 1000)
        c.disconnect()
        c.loop_stop()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--connects", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_dir = root / "coordinator"
        fleet_mosquitto = fleet_broker("mosquitto", root / "fleet", data_dir, BASE)
        with plain_mosquitto(root / "plain") as plain, fleet_mosquitto as fleet:
            result = measure(plain, fleet, data_dir, root, args.messages, args.connects)
    print(json.dumps(result, indent=2))


def measure(plain: str, fleet: FleetBroker, data_dir: Path, root: Path, n: int, k: int) -> dict[str, float]:
    pki = FleetPki(data_dir / "pki").ensure()
    cert, key = device_identity(pki, root / "device")
    device_tls = ssl.create_default_context(cafile=str(pki.ca_path))
    device_tls.load_cert_chain(str(cert), str(key))
    reader_tls = ssl.create_default_context(cafile=str(pki.ca_path))
    reader_tls.load_cert_chain(*(str(p) for p in pki.coordinator_files()))
    plain_rate = throughput(plain, None, None, n)
    tls_rate = throughput(fleet.url, device_tls, reader_tls, n)
    plain_ms = connect_ms(plain, None, k)
    tls_ms = connect_ms(fleet.url, device_tls, k)
    return {
        "messages": n,
        "plain_msgs_per_s": round(plain_rate),
        "mtls_acl_msgs_per_s": round(tls_rate),
        "throughput_ratio_mtls_over_plain": round(tls_rate / plain_rate, 3),
        "plain_connect_ms_p50": round(plain_ms, 2),
        "mtls_connect_ms_p50": round(tls_ms, 2),
        "connect_ratio_mtls_over_plain": round(tls_ms / plain_ms, 2),
    }


if __name__ == "__main__":
    main()
