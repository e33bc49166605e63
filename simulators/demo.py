"""`edgefleet demo`: the main job on the embedded defaults, start to finish in one command.

Starts a coordinator (`edgefleet up`: SQLite + embedded amqtt broker) in its own process, a simulated
fleet of real agents, trains the reference digits classifier and pushes it, deploys it to the whole
fleet with live progress, sends held-out digits to every device's local inference endpoint, and prints
the fleet summary the coordinator computed from the devices' telemetry.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from compression.reference import train_digits_mlp
from simulators.coordinator import CoordinatorClient, CoordinatorError, CoordinatorProcess
from simulators.fleet import FleetConfig, SimulatedFleet
from simulators.traffic import DeviceTraffic, drive_inference

MODEL_NAME = "digits"
MODEL_VERSION = "1.0.0"


def demo(
    devices: Annotated[int, typer.Option(min=1, max=500, help="Simulated devices in the fleet.")] = 20,
    requests: Annotated[int, typer.Option(min=1, help="Inference requests sent to each device.")] = 50,
    data_dir: Annotated[
        Path | None, typer.Option(help="Where coordinator and devices keep their state (default: a temp dir).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the fleet to converge.")] = 120.0,
) -> None:
    """Run the whole flow on the embedded defaults: coordinator, fleet, model, deploy, traffic, summary."""
    console = Console()
    with tempfile.TemporaryDirectory(prefix="edgefleet-demo-") as tmp:
        root = data_dir or Path(tmp)
        try:
            run_demo(console, root, devices=devices, requests=requests, timeout=timeout)
        except (CoordinatorError, DemoError) as exc:
            console.print(f"[bold red]demo failed:[/] {exc}")
            raise typer.Exit(1) from exc


class DemoError(RuntimeError):
    """A step of the demo did not reach its goal in time."""


def run_demo(console: Console, root: Path, *, devices: int, requests: int, timeout: float) -> None:
    """The demo's steps; raises `DemoError`/`CoordinatorError` on the first one that fails."""
    started = time.monotonic()
    coordinator = CoordinatorProcess(root / "coordinator")
    console.print("[bold]1/6[/] starting the coordinator (SQLite, embedded MQTT broker) ...")
    client = coordinator.start()
    try:
        info = client.info()
        console.print(f"    coordinator {client.url}   broker {info.get('mqtt_url')}")
        console.print("[bold]2/6[/] training the digits classifier and pushing it to the registry ...")
        model = train_digits_mlp()
        model_path = root / f"{MODEL_NAME}-{MODEL_VERSION}.onnx"
        model_path.write_bytes(model.onnx_bytes)
        pushed = client.push_model(model_path, name=MODEL_NAME, version=MODEL_VERSION)
        console.print(
            f"    {MODEL_NAME}:{MODEL_VERSION}  sha256 {str(pushed.get('sha256', ''))[:12]}…  "
            f"{len(model.onnx_bytes)} bytes  held-out accuracy {model.accuracy:.3f}"
        )
        fleet_config = FleetConfig(
            devices=devices, data_root=root / "devices", coordinator_url=client.url, id_prefix="demo"
        )
        with SimulatedFleet(fleet_config) as fleet:
            console.print(f"[bold]3/6[/] {devices} device agents started; waiting for them to enrol ...")
            _wait_for_enrolment(client, fleet.device_ids, timeout)
            console.print(f"[bold]4/6[/] deploying {MODEL_NAME}:{MODEL_VERSION} to tag fleet=demo ...")
            deployment = client.deploy(model=MODEL_NAME, version=MODEL_VERSION, tags={"fleet": "demo"})
            _watch_deployment(console, client, deployment["id"], devices, timeout)
            console.print(f"[bold]5/6[/] sending {requests} held-out digits to each device's inference endpoint ...")
            traffic = drive_inference(fleet.agents, requests)
            fleet.flush_telemetry()
            summary = _wait_for_telemetry(client, traffic, timeout=30)
        console.print("[bold]6/6[/] fleet summary (from the devices' telemetry at the coordinator):")
        console.print(_summary_table(summary, traffic))
        sent = sum(t.sent for t in traffic)
        accuracy = sum(t.correct for t in traffic) / max(1, sent - sum(t.errors for t in traffic))
        console.print(
            f"[bold green]done[/] in {time.monotonic() - started:.1f}s: {devices} devices on "
            f"{MODEL_NAME}:{MODEL_VERSION}, {sent} inferences, accuracy {accuracy:.3f}"
        )
    finally:
        code = coordinator.stop()
        if code not in (0, None):
            console.print(f"[yellow]coordinator exited with {code}; see {coordinator.data_dir / 'coordinator.log'}")


def _wait_for_enrolment(client: CoordinatorClient, device_ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    wanted = set(device_ids)
    while time.monotonic() < deadline:
        known = {d["id"] for d in client.devices() if d.get("status") == "online"}
        if wanted <= known:
            return
        time.sleep(0.2)
    raise DemoError(f"only {len(wanted & known)} of {len(wanted)} devices enrolled within {timeout:.0f}s")


def _watch_deployment(
    console: Console, client: CoordinatorClient, deployment_id: Any, total: int, timeout: float
) -> None:
    columns = (
        TextColumn("    active"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
    )
    deadline = time.monotonic() + timeout
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("", total=total)
        while True:
            body = client.deployment(deployment_id)
            targets = body.get("targets", [])
            done = sum(1 for t in targets if t.get("status") == "succeeded")
            failed = [t for t in targets if t.get("status") == "failed"]
            progress.update(task, completed=done, description=f"failed {len(failed)}")
            if failed:
                reasons = "; ".join(
                    f"{t.get('device_id')}: {t.get('error_message') or t.get('error')}" for t in failed[:3]
                )
                raise DemoError(f"{len(failed)} devices failed the update: {reasons}")
            if done == total:
                return
            if time.monotonic() > deadline:
                raise DemoError(f"{done} of {total} devices active after {timeout:.0f}s")
            time.sleep(0.2)


def _wait_for_telemetry(client: CoordinatorClient, traffic: list[DeviceTraffic], timeout: float) -> dict[str, Any]:
    expected = sum(t.sent - t.errors for t in traffic)
    deadline = time.monotonic() + timeout
    while True:
        summary = client.fleet_summary()
        counted = sum(int(d.get("inference_count", 0)) for d in summary.get("devices", []))
        if counted >= expected or time.monotonic() > deadline:
            return summary
        time.sleep(0.2)


def _summary_table(summary: dict[str, Any], traffic: list[DeviceTraffic]) -> Table:
    sent = {t.device_id: t for t in traffic}
    table = Table(show_lines=False)
    for column in ("device", "model", "inferences", "errors", "p50 ms", "p95 ms", "accuracy"):
        table.add_column(column, justify="left" if column in {"device", "model"} else "right")
    for device in summary.get("devices", []):
        ident = device.get("device_id") or device.get("id")
        local = sent.get(str(ident))
        model = f"{device.get('model_name') or '-'}:{device.get('model_version') or '-'}"
        table.add_row(
            str(ident),
            model,
            str(device.get("inference_count", 0)),
            str(device.get("error_count", 0)),
            _ms(device.get("latency_p50_ms")),
            _ms(device.get("latency_p95_ms")),
            f"{local.accuracy:.2f}" if local else "-",
        )
    return table


def _ms(value: Any) -> str:
    return "-" if value is None else f"{float(value):.2f}"
