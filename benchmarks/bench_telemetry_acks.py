"""What end-to-end telemetry acknowledgement costs: ingest with the agents' outbox against ingest without, one run.

N real agents (one process, a model loaded each) close W telemetry windows each as fast as they can, through a
plain Mosquitto, into a coordinator process (`edgefleet up`, SQLite). Two modes, interleaved round by round on
the same broker and coordinator, each round with devices of its own:

- `without`: `telemetry_outbox_windows = 0`, windows are published only (agents before the outbox);
- `with`: every window written to the outbox (fsync) before it is published, deleted when the coordinator's
  acknowledgement confirms it (the default).

Figures per mode (medians over rounds): windows/s the agents publish (their side of the cost), windows/s the
coordinator stores (first publish to last stored), and for `with` windows/s confirmed (to every outbox empty).
Prints JSON with the ratios with / without.

    python benchmarks/bench_telemetry_acks.py [--devices 10] [--windows 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import Agent
from agent.update import SlotStore
from cloud.client import ApiClient
from compression.reference import train_digits_mlp
from protocol import ArtifactRef, ModelSpec, TensorSpec
from simulators import CoordinatorProcess, FleetConfig, SimulatedFleet
from simulators.brokers import plain_mosquitto
from simulators.fleet import agent_config

BASE = "bench/acks/v1"
ROW = np.random.default_rng(0).random((1, 64), dtype=np.float32)


def install(data_dir: Path, model: Path) -> None:
    """The digits model in the device's active slot, as an earlier update would have left it; a seq counter."""
    data = model.read_bytes()
    spec = ModelSpec(
        name="digits",
        version="1.0.0",
        artifact=ArtifactRef(url="http://127.0.0.1:9/unused", sha256=hashlib.sha256(data).hexdigest(), size=len(data)),
        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 64])],
        outputs=[TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 10])],
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    incoming = data_dir / "incoming.onnx"
    incoming.write_bytes(data)
    slots = SlotStore(data_dir / "slots")
    slots.stage("a", incoming, spec)
    slots.activate("a")
    incoming.unlink()
    (data_dir / "telemetry-seq").write_text("0")  # a device that has sent telemetry before: no settling wait


def wait(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until `condition`; the monotonic time it held. RuntimeError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return time.monotonic()


def stored_windows(client: ApiClient) -> int:
    return int(client.get("/stats").get("stored", {}).get("telemetry", 0))


def one_round(
    client: ApiClient, root: Path, model: Path, prefix: str, outbox: int, devices: int, windows: int
) -> dict[str, float]:
    """One mode's round: fresh devices, `windows` windows each; rates in windows/s."""
    config = FleetConfig(
        devices=devices,
        data_root=root / prefix,
        coordinator_url=client.url,
        api_token=client.token,
        topic_base=BASE,
        id_prefix=prefix,
        http=False,
        telemetry_interval_s=3600,
    )
    SimulatedFleet(config).enrol()
    agents = []
    for index in range(devices):
        settings = agent_config(config, index).model_copy(update={"telemetry_outbox_windows": outbox})
        install(settings.data_dir, model)
        agents.append(Agent(settings))
    for agent in agents:
        agent.start()
    try:
        ids = {a.config.device_id for a in agents}

        def online() -> bool:
            return ids <= {d["id"] for d in client.devices() if d.get("status") == "online"}

        wait(online, 60, "agents online")
        time.sleep(1.0)  # their reports and the answers to them
        before, total = stored_windows(client), devices * windows

        def produce(agent: Agent) -> None:
            for _ in range(windows):
                agent.infer({"input": ROW})
                agent.flush_telemetry()

        threads = [threading.Thread(target=produce, args=(a,)) for a in agents]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        published = time.monotonic()
        stored = wait(lambda: stored_windows(client) - before >= total, 300, "every window stored")
        confirmed = wait(lambda: all(not a.telemetry_unconfirmed for a in agents), 300, "every window confirmed")
        return {
            "published_per_s": total / (published - start),
            "stored_per_s": total / (stored - start),
            "confirmed_per_s": total / (confirmed - start) if outbox else float("nan"),
        }
    finally:
        for agent in agents:
            agent.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-acks-") as tmp:
        root = Path(tmp)
        model = root / "digits.onnx"
        model.write_bytes(train_digits_mlp().onnx_bytes)
        with plain_mosquitto(root) as url:
            process = CoordinatorProcess(root / "coordinator", mqtt_url=url, topic_base=BASE)
            client = process.start()
            try:
                rounds: dict[str, list[dict[str, float]]] = {"without": [], "with": []}
                for r in range(args.rounds):
                    for mode, outbox in (("without", 0), ("with", 10_000)):
                        figures = one_round(client, root, model, f"{mode}{r}", outbox, args.devices, args.windows)
                        rounds[mode].append(figures)
                        print(f"round {r} {mode}: {figures}", file=sys.stderr)
            finally:
                process.stop()

    def median(mode: str, key: str) -> float:
        return statistics.median(f[key] for f in rounds[mode])

    result = {
        "devices": args.devices,
        "windows_per_device": args.windows,
        "rounds": args.rounds,
        "without": {key: round(median("without", key), 1) for key in ("published_per_s", "stored_per_s")},
        "with": {key: round(median("with", key), 1) for key in ("published_per_s", "stored_per_s", "confirmed_per_s")},
    }
    result["ratio_published"] = round(result["with"]["published_per_s"] / result["without"]["published_per_s"], 3)
    result["ratio_stored"] = round(result["with"]["stored_per_s"] / result["without"]["stored_per_s"], 3)
    result["ratio_confirmed_vs_stored_without"] = round(
        result["with"]["confirmed_per_s"] / result["without"]["stored_per_s"], 3
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
