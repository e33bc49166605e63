"""`edgefleet sim`: a simulated fleet of real agents against any coordinator, until Ctrl-C or a deadline.

Each device gets `--rps` requests per second of held-out digits drawn at random (the data's real class
mix), on absolute deadlines (`simulators.pacing`); `--tag` adds tags to every device and `--drift` drifts
the inputs of the devices whose tags match (`simulators.drift`), to make one cohort look different.

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
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from cloud.client import read_config
from simulators.drift import DRIFT_KINDS, Drift, parse_drift
from simulators.fleet import FleetConfig, SimulatedFleet
from simulators.pacing import PacedTraffic

__all__ = ["AGENTS_PER_PROCESS", "parse_tags", "sim"]

AGENTS_PER_PROCESS = 250
_STATUS_EVERY_S = 5.0
_DRIFT_HELP = (
    "KIND[=AMOUNT][:TAG=VALUE,...]: drift the inputs of the devices with these tags (all without), e.g. "
    "rotate:site=site-1, noise=0.5:ring=canary, invert. Kinds: "
    + "; ".join(
        f"{kind} ({meaning}" + ("" if default is None else f", default {default:g}") + ")"
        for kind, (default, meaning) in DRIFT_KINDS.items()
    )
    + ". Repeat."
)


def _fail(message: str) -> NoReturn:
    """One error line on stderr and exit 1: a user error is not a traceback."""
    Console(stderr=True, highlight=False).print(f"[red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(1)


def parse_tags(values: list[str]) -> dict[str, str]:
    """`["site=b", "team=vision"]` → tags; `ValueError` names a value that is not KEY=VALUE."""
    tags: dict[str, str] = {}
    for value in values:
        key, sep, tag = value.partition("=")
        if not sep or not key.strip() or not tag.strip():
            raise ValueError(f"--tag {value!r}: use KEY=VALUE, e.g. --tag site=b")
        tags[key.strip()] = tag.strip()
    return tags


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
    rps: Annotated[
        float, typer.Option(min=0, help="Inference requests per second per device, held steady (0: none).")
    ] = 1.0,
    tag: Annotated[
        list[str] | None,
        typer.Option("--tag", help="KEY=VALUE added to every device's tags (overrides fleet/ring/site). Repeat."),
    ] = None,
    drift: Annotated[list[str] | None, typer.Option("--drift", help=_DRIFT_HELP)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random digits each device is sent.")] = 0,
    telemetry_interval: Annotated[
        float, typer.Option(min=0.1, help="Seconds between a device's telemetry windows.")
    ] = 5.0,
    http: Annotated[bool, typer.Option(help="Give every device its local inference endpoint.")] = True,
    processes: Annotated[
        int, typer.Option(min=0, help=f"Processes to spread the agents over (0: one per {AGENTS_PER_PROCESS}).")
    ] = 0,
    first_index: Annotated[int, typer.Option(hidden=True, help="Worker: first device index of this process.")] = 0,
    fleet_size: Annotated[int, typer.Option(hidden=True, help="Worker: devices of the whole fleet.")] = 0,
) -> None:
    """Run a fleet of real agents (the real agent code, one identity and data dir each) and send them traffic.

    Example: edgefleet sim --devices 6 --tag team=vision --rps 5 --drift rotate:site=site-1
    """
    console = Console()
    try:
        tags = parse_tags(tag or [])
        drifts = [parse_drift(text) for text in drift or []]
    except ValueError as exc:
        _fail(str(exc))
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
            tags=tags,
            http=http,
            telemetry_interval_s=telemetry_interval,
            first_index=first_index,
            fleet_size=fleet_size or None,
        )
        _run_fleet(console, config, duration=duration, rps=rps, drifts=drifts, seed=seed + first_index)


def _run_fleet(
    console: Console, config: FleetConfig, *, duration: float, rps: float, drifts: list[Drift], seed: int
) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    fleet = SimulatedFleet(config)
    console.print(f"starting {config.devices} agents against {config.coordinator_url or config.mqtt_url} ...")
    fleet.start()
    shared = " ".join(f"{k}={v}" for k, v in {"fleet": config.id_prefix, **config.tags}.items())
    console.print(f"[green]{config.devices} agents running[/] (tags {shared}); Ctrl-C to stop")
    for one in drifts:
        drifted = sum(one.applies_to(agent.config.tags) for agent in fleet.agents)
        console.print(f"drift {one.describe()}: {drifted} of {config.devices} devices")
    traffic = PacedTraffic(fleet.agents, rps, drifts=drifts, seed=seed) if rps > 0 else None
    deadline = time.monotonic() + duration if duration > 0 else None
    try:
        if traffic is not None:
            traffic.start()
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            left = _STATUS_EVERY_S if deadline is None else min(_STATUS_EVERY_S, deadline - time.monotonic())
            stop.wait(max(left, 0.0))
            console.print("  " + _status_line(fleet, traffic))
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping agents ...")
        if traffic is not None:
            traffic.stop()
        fleet.stop()


def _status_line(fleet: SimulatedFleet, traffic: PacedTraffic | None) -> str:
    """`digits:1.0 x3  - x1  |  14.8 answered req/s` (the rate since the traffic started)."""
    versions: dict[str, int] = {}
    for agent in fleet.agents:
        key = f"{agent.active_model.name}:{agent.active_model.version}" if agent.active_model else "-"
        versions[key] = versions.get(key, 0) + 1
    line = "  ".join(f"{k} x{v}" for k, v in sorted(versions.items()))
    return line if traffic is None else f"{line}  |  {traffic.answered_rate():.1f} answered req/s"


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
