"""How long a crash strands the fleet: from a coordinator's restart to every agent reconnected and online, one run.

N real agents (`simulators.SimulatedFleet`, enrolled through the API) on a coordinator in a process of its own
(`edgefleet up`, fixed HTTP port), SIGKILLed and restarted on the same data directory after `--down` seconds:

(a) `embedded`: on its embedded broker, which dies with it and comes back on its kept port;
(b) `mosquitto`: on the fleet's Mosquitto (`edgefleet broker mosquitto-config`), killed and restarted with the
    coordinator on the same port: the same outage as (a), with Mosquitto as the broker (the baseline);
(c) `mosquitto_coordinator_only`: on the fleet's Mosquitto, only the coordinator killed: the agents keep their
    broker connection, and their statuses carry over (the broker delivers the wills).

Per scenario, seconds from the restart command to: the coordinator healthy (`healthy_s`); every agent's MQTT
connection up (`connected_s`); every device `online` through the API (`online_s`). Agents back off 1 s doubling
(paho's default, up to `reconnect_max_s` 60 s), so a longer outage costs more than itself. Prints JSON.

    python benchmarks/bench_restart.py [--devices 10] [--down 1.0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cloud.client import ApiClient
from simulators import CoordinatorProcess, FleetConfig, SimulatedFleet
from simulators.brokers import BrokerStartError, MosquittoProcess, free_port

BASE = "bench/restart/v1"
_TIMEOUT_S = 120.0


def wait(condition: Callable[[], bool], what: str, timeout: float = _TIMEOUT_S) -> float:
    """Poll `condition` every 20 ms; the monotonic time it first held. RuntimeError after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic()


def coordinator(data_dir: Path, mqtt_url: str | None, extra: tuple[str, ...], http_port: int) -> CoordinatorProcess:
    settings = data_dir.parent / "coordinator.toml"
    settings.write_text("embedded_broker_port = 0\n")  # a free port on first start, kept afterwards
    args = ("--config", str(settings), "--port", str(http_port), *extra)
    return CoordinatorProcess(data_dir, mqtt_url=mqtt_url, topic_base=BASE, extra_args=args)


def statuses(client: ApiClient) -> set[str]:
    try:
        return {d["status"] for d in client.devices()}
    except Exception:  # the coordinator is not answering yet
        return set()


@contextmanager
def fleet_on(client: ApiClient, root: Path, devices: int) -> Iterator[SimulatedFleet]:
    config = FleetConfig(
        devices=devices,
        data_root=root,
        coordinator_url=client.url,
        api_token=client.token,
        topic_base=BASE,
        id_prefix="rst",
        http=False,
        telemetry_interval_s=3600,
    )
    with SimulatedFleet(config) as fleet:
        wait(lambda: statuses(client) == {"online"}, "the fleet online")
        yield fleet


def crash_and_restart(
    process: CoordinatorProcess, fleet: SimulatedFleet, down_s: float, broker: MosquittoProcess | None
) -> dict[str, float]:
    """Kill (the coordinator, and `broker`), wait `down_s`, restart; seconds to healthy, connected, online."""
    process.kill()
    if broker is not None:
        broker.kill()
    time.sleep(down_s)
    started = time.monotonic()
    if broker is not None:
        broker.start()
    client = process.start()
    healthy = time.monotonic()
    transports = [agent._transport for agent in fleet.agents]  # the agents' MQTT connections
    connected = wait(lambda: all(t is not None and t.connected for t in transports), "every agent connected")
    online = wait(lambda: statuses(client) == {"online"}, "every device online")
    return {
        "healthy_s": round(healthy - started, 2),
        "connected_s": round(max(connected, healthy) - started, 2),
        "online_s": round(online - started, 2),
    }


def scenario(root: Path, devices: int, down_s: float, kind: str) -> dict[str, float]:
    data_dir = root / kind / "coordinator"
    data_dir.mkdir(parents=True)
    broker = None
    if kind != "embedded":
        try:
            broker = MosquittoProcess(root / kind / "mosquitto", data_dir, BASE, persistence=True)
        except BrokerStartError as exc:
            raise SystemExit(f"{exc}: no baseline") from exc
        broker.start()
    process = coordinator(
        data_dir, broker.url if broker else None, broker.coordinator_args if broker else (), free_port()
    )
    client = process.start()
    try:
        with fleet_on(client, root / kind / "fleet", devices) as fleet:
            killed_broker = broker if kind == "mosquitto" else None
            return crash_and_restart(process, fleet, down_s, killed_broker)
    finally:
        process.stop()
        if broker is not None:
            broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--down", type=float, default=1.0, help="seconds between the kill and the restart")
    args = parser.parse_args()
    result: dict[str, object] = {"devices": args.devices, "down_s": args.down}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("embedded", "mosquitto", "mosquitto_coordinator_only"):
            result[kind] = scenario(Path(tmp), args.devices, args.down, kind)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
