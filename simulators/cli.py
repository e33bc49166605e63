"""`edgefleet sim`: a simulated fleet of real agents against any coordinator, until Ctrl-C or a deadline."""

from __future__ import annotations

import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from simulators.fleet import FleetConfig, SimulatedFleet
from simulators.traffic import drive_inference


def sim(
    devices: Annotated[int, typer.Option(min=1, max=5000, help="How many device agents to run.")] = 10,
    coordinator: Annotated[str, typer.Option(help="Coordinator URL; the MQTT URL is asked from it.")] = (
        "http://127.0.0.1:8080"
    ),
    mqtt_url: Annotated[str | None, typer.Option(help="MQTT broker URL, if not the coordinator's.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Root of the devices' data dirs (default: a temp dir).")] = None,
    prefix: Annotated[
        str, typer.Option(help="Device ids are PREFIX-0000, PREFIX-0001, ...; tag fleet=PREFIX.")
    ] = "sim",
    duration: Annotated[float, typer.Option(help="Stop after this many seconds (0: until Ctrl-C).")] = 0.0,
    rps: Annotated[float, typer.Option(help="Inference requests per second per device (0: none).")] = 1.0,
    http: Annotated[bool, typer.Option(help="Give every device its local inference endpoint.")] = True,
) -> None:
    """Run a fleet of real agents (the real agent code, one identity and data dir each)."""
    console = Console()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with tempfile.TemporaryDirectory(prefix="edgefleet-sim-") as tmp:
        config = FleetConfig(
            devices=devices,
            data_root=data_dir or Path(tmp),
            coordinator_url=coordinator,
            mqtt_url=mqtt_url,
            id_prefix=prefix,
            http=http,
        )
        fleet = SimulatedFleet(config)
        console.print(f"starting {devices} agents against {coordinator} ...")
        fleet.start()
        console.print(f"[green]{devices} agents running[/] (tags fleet={prefix}); Ctrl-C to stop")
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
