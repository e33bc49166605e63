"""Rollout control-plane benchmark: how fast a rollout converges over N real agents, and bytes served per device.

(a) convergence: a coordinator process (`edgefleet up`, Mosquitto) rolls a tiny model out to N agents in
    `edgefleet sim` processes (no HTTP endpoint), one 100 % wave, gates off, every download allowed at once; timed
    from the rollout's creation to every device reported on the new version — devices per minute. With `--light`
    the devices are light simulated devices (`simulators.light`: a real MQTT session with its own certificate, a
    real HTTP download checked against the sha256, the agent's reported states and events; no inference runtime),
    enrolled with a fleet bootstrap secret, so that the coordinator, not N ONNX Runtime sessions, is measured;
(b) bytes: a counting proxy in front of the coordinator's artifact route (the coordinator's public URL)
    counts artifact bytes served, per device, against the artifact's size;
(c) baseline, same run: N raw paho clients on the same broker, each answering a QoS 1 message with an ack;
    publish-to-all-acks time as clients per minute — what the MQTT round trips alone cost.

Run: `.venv/bin/python benchmarks/bench_rollout.py [--devices 1000]` (a few minutes for 1,000);
`.venv/bin/python benchmarks/bench_rollout.py --light --devices 10000 [--processes 4]`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import onnx
import paho.mqtt.client as mqtt
from onnx import TensorProto, helper
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud.client import ApiClient
from simulators import CoordinatorProcess
from simulators.brokers import FleetBroker, fleet_broker
from simulators.light import LightFleet


def tiny_model() -> bytes:
    """A valid ONNX model of a few hundred bytes: input FP32 [batch, 4] → Relu → output."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["probabilities"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def mosquitto(workdir: Path) -> Iterator[str]:
    """A private Mosquitto on a free loopback port."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        # as `edgefleet broker mosquitto-config`: the coordinator's queue holds a 10k-device burst (~19 messages each)
        "max_queued_messages 1000000\nmax_inflight_messages 100\nmax_connections -1\n"
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


class CountingProxy:
    """Forwards GETs to `upstream` (Range included) and counts the body bytes it served."""

    def __init__(self) -> None:
        self.upstream = ""
        self.bytes = 0
        self.requests = 0
        self.lock = threading.Lock()
        self.client = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=64))
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                headers = {"Range": self.headers["Range"]} if self.headers.get("Range") else {}
                response = proxy.client.get(proxy.upstream + self.path, headers=headers)
                self.send_response(response.status_code)
                for name in ("content-type", "content-range", "accept-ranges"):
                    if name in response.headers:
                        self.send_header(name, response.headers[name])
                self.send_header("Content-Length", str(len(response.content)))
                self.end_headers()
                self.wfile.write(response.content)
                with proxy.lock:
                    proxy.bytes += len(response.content)
                    proxy.requests += 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class FixedPortCoordinator(CoordinatorProcess):
    """`edgefleet up` on a port known before it starts, so the proxy can forward to it."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.port = free_port()

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("--port") + 1] = str(self.port)
        return cmd


PER_PROCESS = 250  # paho waits with select(): one process cannot watch file descriptors above 1023


def baseline_worker(broker_url: str, first: int, count: int) -> None:
    """`--baseline-worker`: `count` paho clients that answer `base/cmd/i` with `base/ack/i`; 'ready' when subscribed."""
    host, port = broker_url.removeprefix("mqtt://").split(":")
    subscribed = threading.Semaphore(0)
    clients = []
    for index in range(first, first + count):
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"base-{index}")

        def on_connect(c: mqtt.Client, *_: object, index: int = index) -> None:
            c.subscribe(f"base/cmd/{index}", qos=1)

        def on_message(c: mqtt.Client, _u: object, m: mqtt.MQTTMessage, index: int = index) -> None:
            c.publish(f"base/ack/{index}", b"ok", qos=1)

        client.on_connect = on_connect
        client.on_subscribe = lambda *_: subscribed.release()
        client.on_message = on_message
        client.connect_async(host, int(port))
        client.loop_start()
        clients.append(client)
    for _ in clients:
        if not subscribed.acquire(timeout=120):
            raise SystemExit("baseline worker: subscriptions did not complete")
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    for client in clients:
        client.disconnect()
        client.loop_stop()


def mqtt_baseline(broker_url: str, clients: int, timeout: float = 120) -> float:
    """Seconds from publishing one QoS 1 message to each of `clients` paho clients (in worker processes) to
    all their acks."""
    host, port = broker_url.removeprefix("mqtt://").split(":")
    acked: set[int] = set()
    done = threading.Event()
    ready = threading.Event()
    lock = threading.Lock()
    collector = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="base-collector")
    collector.max_inflight_messages_set(0)  # unlimited: the baseline measures the broker, not paho's window

    def on_ack(_c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        with lock:
            acked.add(int(m.topic.rsplit("/", 1)[1]))
            if len(acked) == clients:
                done.set()

    collector.on_message = on_ack
    collector.on_connect = lambda c, *_: c.subscribe("base/ack/+", qos=1)
    collector.on_subscribe = lambda *_: ready.set()
    collector.connect_async(host, int(port))
    collector.loop_start()
    workers = []
    for first in range(0, clients, PER_PROCESS):
        count = min(PER_PROCESS, clients - first)
        command = [sys.executable, __file__, "--baseline-worker", broker_url, str(first), str(count)]
        workers.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    try:
        for worker in workers:
            assert worker.stdout is not None
            if worker.stdout.readline().strip() != "ready":
                raise RuntimeError("baseline: a worker did not get ready")
        if not ready.wait(timeout):
            raise RuntimeError("baseline: the collector did not subscribe")
        start = time.perf_counter()
        for index in range(clients):
            collector.publish(f"base/cmd/{index}", b"go", qos=1)
        done.wait(timeout)
        elapsed = time.perf_counter() - start
    finally:
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.close()
            worker.wait(60)
        collector.disconnect()
        collector.loop_stop()
    if len(acked) < clients:
        raise RuntimeError(f"baseline: only {len(acked)}/{clients} acks in {timeout}s")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--light", action="store_true", help="light simulated devices instead of real agents")
    parser.add_argument("--processes", type=int, default=0, help="light device processes (0: one per 2,500)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the raw MQTT baseline")
    parser.add_argument(
        "--profile", type=Path, help="sample the coordinator's threads (benchmarks/sampler) into this JSON file"
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        help="py-spy (--gil, collapsed stacks) of the coordinator from the rollout's creation to its end, into FILE",
    )
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 65536), hard), hard))
    n = args.devices
    with tempfile.TemporaryDirectory() as tmp, mosquitto(Path(tmp)) as broker_url:
        root = Path(tmp)
        fleet_mosquitto = fleet_broker("mosquitto", root / "fleet-broker", root / "coordinator", "bench/rollout/v1")
        with fleet_mosquitto as fleet:
            result = run(args, root, fleet, broker_url, n)
    print(json.dumps(result, indent=2))


def run(args: argparse.Namespace, root: Path, fleet: FleetBroker, broker_url: str, n: int) -> dict[str, object]:
    """Enrol and start the fleet, roll the model out, measure; the MQTT baseline on the plain broker."""
    proxy = CountingProxy()
    os.environ["EDGEFLEET_ROLLOUT_TICK_S"] = "0.2"
    os.environ["EDGEFLEET_PUBLIC_URL"] = proxy.url
    env = {}
    if args.profile is not None:  # the sampler is loaded as sitecustomize: no coordinator code changes
        env = {
            "PYTHONPATH": str(Path(__file__).parent / "sampler"),
            "EDGEFLEET_SAMPLE_OUT": str(args.profile.resolve()),
        }
    process = FixedPortCoordinator(
        root / "coordinator",
        mqtt_url=fleet.url,
        topic_base="bench/rollout/v1",
        extra_args=fleet.coordinator_args,
        env=env,
    )
    proxy.upstream = f"http://127.0.0.1:{process.port}"
    client = process.start()
    client.url = proxy.upstream  # the API directly; devices fetch artifacts through the proxy
    model = root / "tiny.onnx"
    model.write_bytes(tiny_model())
    size = model.stat().st_size
    client.push_model(model, name="tiny", version="1.0")
    if args.light:
        try:
            return run_light(args, root, client, process, proxy, n, size, broker_url)
        finally:
            process.stop()  # also when the fleet failed: no coordinator left behind
    # The fleet runs as `edgefleet sim` in worker processes (paho's select() caps one process's sockets).
    sim = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "edgefleet"),
            "sim",
            "--devices",
            str(n),
            "--coordinator",
            client.url,
            "--token",
            str(client.token),
            "--prefix",
            "b",
            "--no-http",
            "--rps",
            "0",
            "--data-dir",
            str(root / "fleet"),
        ],
        stdout=subprocess.DEVNULL,
    )
    started = time.perf_counter()
    deadline = time.monotonic() + args.timeout
    while len(client.devices()) < n and time.monotonic() < deadline:
        time.sleep(1.0)
    enrolled = time.perf_counter() - started
    t0 = time.perf_counter()
    created = client.create_rollout(rollout_plan(n, args.timeout))
    status = wait_completed(client, created["id"], deadline)
    converged = time.perf_counter() - t0
    on_version = sum(1 for d in client.devices() if d.get("active_model_version") == "1.0")
    sim.send_signal(signal.SIGTERM)
    sim.wait(120)
    process.stop()
    baseline = 0.0 if args.no_baseline else mqtt_baseline(broker_url, n)
    result = {
        "devices_kind": "real agents (edgefleet sim)",
        "devices": n,
        "enrol_s": round(enrolled, 1),
        "rollout_status": status,
        "devices_on_new_version": on_version,
        "rollout_converge_s": round(converged, 2),
        "rollout_devices_per_min": round(n / converged * 60),
        "artifact_bytes": size,
        "bytes_served_per_device": round(proxy.bytes / n, 1),
        "artifact_requests": proxy.requests,
        **_baseline_figures(baseline, n),
    }
    return result


def _py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling the coordinator's thread that holds the GIL (collapsed stacks, per thread) until SIGINT."""
    options = ["--gil", "--nonblocking", "--threads", "--format", "raw", "--pid", str(pid), "--output", str(out)]
    spy = subprocess.Popen(
        [str(Path(sys.executable).parent / "py-spy"), "record", *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attached before the rollout starts
    return spy


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) a process has used so far, from /proc (0.0 where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15 of stat


def _baseline_figures(baseline: float, n: int) -> dict[str, object]:
    if not baseline:
        return {}
    return {"mqtt_baseline_s": round(baseline, 2), "mqtt_baseline_clients_per_min": round(n / baseline * 60)}


def rollout_plan(n: int, timeout: float) -> dict[str, object]:
    """One 100 % wave, gates off, every download at once."""
    return {
        "model": "tiny",
        "version": "1.0",
        "waves": [{"percent": 100, "bake_seconds": 0}],
        "gates": dict.fromkeys(
            ["max_install_failure_rate", "max_error_rate_increase", "max_p95_latency_ratio", "max_psi"]
        ),
        "max_concurrent_downloads": n,
        "device_timeout_seconds": timeout,
    }


def wait_completed(client: ApiClient, rollout_id: int, deadline: float) -> str:
    """Poll the rollout until it is completed (or the deadline); its last status."""
    status = ""
    while time.monotonic() < deadline:
        status = client.get(f"/rollouts/{rollout_id}", decisions=0, devices=0)["status"]
        if status == "completed":
            break
        time.sleep(0.2)
    return str(status)


def run_light(
    args: argparse.Namespace,
    root: Path,
    client: ApiClient,
    process: CoordinatorProcess,
    proxy: CountingProxy,
    n: int,
    size: int,
    broker_url: str,
) -> dict[str, object]:
    """The same rollout to N light devices (enrolled with a bootstrap secret, in `--processes` processes)."""
    secret = client.post_json("/bootstrap-secrets", {"name": "bench-light", "tags": {"fleet": "light"}})["secret"]
    processes = args.processes or -(-n // 2500)
    fleet = LightFleet(
        coordinator_url=client.url, bootstrap_secret=secret, devices=n, data_root=root / "light", processes=processes
    )
    started = time.perf_counter()
    fleet.start(timeout=args.timeout)
    enrolled = time.perf_counter() - started
    deadline = time.monotonic() + args.timeout
    pid = process.proc.pid if process.proc is not None else 0
    spy = _py_spy(pid, args.py_spy) if args.py_spy is not None else None
    cpu0 = process_cpu_s(pid)
    t0 = time.perf_counter()
    created = client.create_rollout(rollout_plan(n, args.timeout))
    status = wait_completed(client, created["id"], deadline)
    converged = time.perf_counter() - t0
    coordinator_cpu = process_cpu_s(pid) - cpu0
    if spy is not None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
        spy.wait(60)
    on_version = sum(1 for d in client.devices() if d.get("active_model_version") == "1.0")
    devices = fleet.stop()
    process.stop()
    baseline = 0.0 if args.no_baseline else mqtt_baseline(broker_url, n)
    return {
        "devices_kind": f"light simulated devices in {processes} processes",
        "devices": n,
        "enrol_and_connect_s": round(enrolled, 1),
        "rollout_status": status,
        "devices_on_new_version": on_version,
        "rollout_converge_s": round(converged, 2),
        "rollout_devices_per_min": round(n / converged * 60),
        # The coordinator's CPU (user + system, all threads) from the rollout's creation to its end: what the
        # rollout cost it, less sensitive than the wall time to what else runs on a shared machine.
        "coordinator_cpu_s": round(coordinator_cpu, 2),
        "coordinator_cpu_ms_per_device": round(coordinator_cpu / n * 1000, 2),
        "artifact_bytes": size,
        "bytes_served_per_device": round(proxy.bytes / n, 1),
        "bytes_served_per_device_over_artifact": round(proxy.bytes / n / size, 4),
        "artifact_requests": proxy.requests,
        "device_downloads": devices.downloads,
        "devices_downloading_more_than_once": sum(1 for d in devices.devices.values() if d["downloads"] > 1),
        # Published by the devices, connect included (an `online` report and `agent.started` each, more on reconnects).
        "reports_per_device": round(sum(int(d.get("reports_sent", 0)) for d in devices.devices.values()) / n, 2),
        "events_per_device": round(sum(int(d.get("events_sent", 0)) for d in devices.devices.values()) / n, 2),
        **_baseline_figures(baseline, n),
    }


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--baseline-worker":
        baseline_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
