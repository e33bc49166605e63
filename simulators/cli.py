"""`edgefleet sim`: a simulated fleet of real agents against any coordinator, until Ctrl-C or a deadline.

Large fleets are split over several processes: paho-mqtt waits on its sockets with `select()`, which
cannot watch file descriptors above 1023, so one process holds a few hundred agents at most.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cloud.client import read_config
from simulators.fleet import FleetConfig, SimulatedFleet
from simulators.traffic import drive_inference

AGENTS_PER_PROCESS = 250


def sim(
    devices: Annotated[int, typer.Option(min=1, max=10000, help="How many device agents to run.")] = 10,
    coordinator: Annotated[
        str, typer.Option(help="Coordinator URL; devices enrol there and learn the broker's address.")
    ] = "http://127.0.0.1:8080",
    token: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFLEET_TOKEN",
            help="Operator API token that enrols the devices (default: the CLI config's token).",
        ),
    ] = None,
    mqtt_url: Annotated[str | None, typer.Option(help="MQTT broker URL, if not the coordinator's.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Root of the devices' data dirs (default: a temp dir).")] = None,
    prefix: Annotated[
        str, typer.Option(help="Device ids are PREFIX-0000, PREFIX-0001, ...; tag fleet=PREFIX.")
    ] = "sim",
    duration: Annotated[float, typer.Option(help="Stop after this many seconds (0: until Ctrl-C).")] = 0.0,
    rps: Annotated[float, typer.Option(help="Inference requests per second per device (0: none).")] = 1.0,
    http: Annotated[bool, typer.Option(help="Give every device its local inference endpoint.")] = True,
    processes: Annotated[
        int, typer.Option(min=0, help=f"Processes to spread the agents over (0: one per {AGENTS_PER_PROCESS}).")
    ] = 0,
    first_index: Annotated[int, typer.Option(hidden=True, help="Worker: first device index of this process.")] = 0,
    fleet_size: Annotated[int, typer.Option(hidden=True, help="Worker: devices of the whole fleet.")] = 0,
) -> None:
    """Run a fleet of real agents (the real agent code, one identity and data dir each)."""
    console = Console()
    workers = processes or math.ceil(devices / AGENTS_PER_PROCESS)
    with tempfile.TemporaryDirectory(prefix="edgefleet-sim-") as tmp:
        root = data_dir or Path(tmp)
        if workers > 1:
            args = sys.argv[1:]
            _run_workers(console, workers, devices, root, args[args.index("sim") + 1 :] if "sim" in args else args)
            return
        config = FleetConfig(
            devices=devices,
            data_root=root,
            coordinator_url=coordinator,
            api_token=token or read_config().token,
            mqtt_url=mqtt_url,
            id_prefix=prefix,
            http=http,
            first_index=first_index,
            fleet_size=fleet_size or None,
        )
        _run_fleet(console, config, duration=duration, rps=rps)


def _run_fleet(console: Console, config: FleetConfig, *, duration: float, rps: float) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    fleet = SimulatedFleet(config)
    console.print(f"starting {config.devices} agents against {config.coordinator_url or config.mqtt_url} ...")
    fleet.start()
    console.print(f"[green]{config.devices} agents running[/] (tags fleet={config.id_prefix}); Ctrl-C to stop")
    deadline = time.monotonic() + duration if duration > 0 else None
    try:
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            started = time.monotonic()
            serving = [a for a in fleet.agents if a.active_model is not None]
            if rps > 0 and serving:
                drive_inference(serving, max(1, int(rps)))
            versions: dict[str, int] = {}
            for agent in fleet.agents:
                key = f"{agent.active_model.name}:{agent.active_model.version}" if agent.active_model else "-"
                versions[key] = versions.get(key, 0) + 1
            console.print("  " + "  ".join(f"{k} x{v}" for k, v in sorted(versions.items())))
            stop.wait(max(0.0, 1.0 - (time.monotonic() - started)) + 4.0)
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping agents ...")
        fleet.stop()


def _run_workers(console: Console, workers: int, devices: int, root: Path, argv: list[str]) -> None:
    """Split the fleet over `workers` processes of `edgefleet sim`, and stop them together."""
    share = math.ceil(devices / workers)
    base = _without_options(argv, {"--devices", "--processes", "--data-dir", "--first-index", "--fleet-size"})
    command = [str(Path(sys.executable).parent / "edgefleet"), "sim", *base]
    procs = []
    for k in range(workers):
        count = min(share, devices - k * share)
        if count <= 0:
            break
        procs.append(
            subprocess.Popen(
                [
                    *command,
                    "--devices",
                    str(count),
                    "--processes",
                    "1",
                    "--data-dir",
                    str(root / f"worker-{k}"),
                    "--first-index",
                    str(k * share),
                    "--fleet-size",
                    str(devices),
                ]
            )
        )
    console.print(f"{devices} agents in {len(procs)} processes of up to {share}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.is_set() and any(p.poll() is None for p in procs):
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _without_options(argv: list[str], names: set[str]) -> list[str]:
    """`argv` minus the given `--name value` / `--name=value` options."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif arg.split("=", 1)[0] not in names:
            out.append(arg)
    return out
