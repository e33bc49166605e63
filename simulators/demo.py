"""`edgefleet demo`: the main job on the embedded defaults, start to finish in one command.

Starts a coordinator (`edgefleet up`: SQLite + embedded amqtt broker) in its own process, a simulated
fleet of real agents, trains the reference digits classifier and pushes it, deploys it to the whole
fleet with live progress, sends held-out digits to every device's local inference endpoint, and prints
the fleet summary the coordinator computed from the devices' telemetry.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cloud.client import ApiClient, ApiError
from protocol.errors import ManifestError
from protocol.manifest import read_manifest
from simulators.coordinator import CoordinatorError, CoordinatorProcess
from simulators.demo_federated import FederatedDemoError, run_federated_demo
from simulators.fleet import MIXED_PROFILES, FleetConfig, SimulatedFleet
from simulators.traffic import DeviceTraffic, drive_inference

MODEL_NAME = "digits-cnn"
MODEL_VERSION = "1.0.0"
VARIANTS = "int8-static,int8-dynamic,fp16,tflite-int8"


def _edgefleet() -> str:
    return str(Path(sys.executable).parent / "edgefleet")


def _compress(out: Path) -> Path:
    """`edgefleet compress digits-cnn`: train, build every variant, measure and gate them."""
    command = [
        _edgefleet(),
        "compress",
        "digits-cnn",
        "--out",
        str(out),
        "--to",
        VARIANTS,
        "--no-memory",
        "--latency-iterations",
        "100",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode not in (0, 1):  # 1: some variant refused by the gate; the rest still ship
        raise DemoError(f"edgefleet compress failed ({result.returncode}): {result.stderr[-2000:]}")
    return out


def _push_variants(client: ApiClient, directory: Path) -> None:
    """`edgefleet models push --variants`: the fp32 model and every accepted variant under one version."""
    command = [
        _edgefleet(),
        "models",
        "push",
        "--variants",
        str(directory),
        "--name",
        MODEL_NAME,
        "--version",
        MODEL_VERSION,
        "--url",
        client.url,
        "--token",
        str(client.token),
        "--json",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise DemoError(f"edgefleet models push failed: {result.stdout[-1000:]}{result.stderr[-1000:]}")


def demo(
    devices: Annotated[int, typer.Option(min=1, max=500, help="Simulated devices in the fleet.")] = 20,
    requests: Annotated[int, typer.Option(min=1, help="Inference requests sent to each device.")] = 50,
    data_dir: Annotated[
        Path | None, typer.Option(help="Where coordinator and devices keep their state (default: a temp dir).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the fleet to converge.")] = 120.0,
    federated: Annotated[
        bool,
        typer.Option(
            "--federated",
            help="Instead: federated retraining on a small cohort (a SuperLink, 6 devices with SuperNodes, a noisy "
            "cohort retrained, its candidate compressed, signed and canaried; about 5 minutes; needs .venv-flower).",
        ),
    ] = False,
    stay: Annotated[
        bool,
        typer.Option(
            "--stay", help="After the summary, keep the coordinator, its dashboard and the fleet up until Ctrl-C."
        ),
    ] = False,
) -> None:
    """Run the whole flow on the embedded defaults: coordinator, fleet, model, deploy, traffic, summary."""
    # Wide enough for the summary table even when the output is not a terminal (CI logs, pipes).
    console = Console() if Console().is_terminal else Console(width=150)
    with tempfile.TemporaryDirectory(prefix="edgefleet-demo-") as tmp:
        root = data_dir or Path(tmp)
        try:
            if federated:
                run_federated_demo(console, root, timeout=max(timeout, 900.0))
            else:
                run_demo(console, root, devices=devices, requests=requests, timeout=timeout, stay=stay)
        except (CoordinatorError, DemoError, FederatedDemoError, ApiError, ManifestError) as exc:
            console.print(f"[bold red]demo failed:[/] {exc}")
            raise typer.Exit(1) from exc


class DemoError(RuntimeError):
    """A step of the demo did not reach its goal in time."""


def run_demo(console: Console, root: Path, *, devices: int, requests: int, timeout: float, stay: bool = False) -> None:
    """The demo's steps; raises `DemoError`, `CoordinatorError`, `ApiError` or `ManifestError` on a failure.

    With `stay`, coordinator and fleet stay up after the summary until Ctrl-C (the dashboard stays readable)."""
    started = time.monotonic()
    coordinator = CoordinatorProcess(root / "coordinator")
    console.print("[bold]1/6[/] starting the coordinator (SQLite, embedded MQTT broker) ...")
    client = coordinator.start()
    try:
        info = client.info()
        console.print(f"    coordinator {client.url}   broker {info.get('mqtt_url')}")
        dashboard = _dashboard_line(client)
        console.print(f"    {dashboard}")
        console.print("[bold]2/6[/] training the reference CNN on the digits, compressing it to int8/fp16/TFLite ...")
        variants_dir = _compress(root / "compressed")
        _push_variants(client, variants_dir)
        _print_variants(console, variants_dir)
        fleet_config = FleetConfig(
            devices=devices,
            data_root=root / "devices",
            coordinator_url=client.url,
            id_prefix="demo",
            profiles=MIXED_PROFILES,
            api_token=client.token,  # the fleet enrols itself: one enrolment token per device
        )
        with SimulatedFleet(fleet_config) as fleet:
            kind_names = ", ".join(p.name for p in MIXED_PROFILES)
            console.print(f"[bold]3/6[/] {devices} device agents enrolled and started ({kind_names}) ...")
            _wait_for_enrolment(client, fleet.device_ids, timeout)
            version = client.model_version(MODEL_NAME, MODEL_VERSION)
            console.print(
                f"[bold]4/6[/] deploying {MODEL_NAME}:{MODEL_VERSION} to tag fleet=demo ({version['risk_class']} "
                f"risk, {version['signing_state']} in the fleet's TUF repository; every device verifies it and its "
                "signed director instruction before installing) ..."
            )
            deployment = client.deploy(model=MODEL_NAME, version=MODEL_VERSION, tags={"fleet": "demo"})
            _watch_deployment(console, client, deployment["id"], devices, timeout)
            console.print(f"[bold]5/6[/] sending {requests} held-out digits to each device's inference endpoint ...")
            traffic = drive_inference(fleet.agents, requests)
            fleet.flush_telemetry()
            summary = _wait_for_telemetry(client, traffic, timeout=30)
            kinds = {a.config.device_id: a.config.tags.get("profile", "-") for a in fleet.agents}
            console.print("[bold]6/6[/] fleet summary (from the devices' telemetry at the coordinator):")
            console.print(_summary_table(summary, traffic, kinds))
            sent = sum(t.sent for t in traffic)
            accuracy = sum(t.correct for t in traffic) / max(1, sent - sum(t.errors for t in traffic))
            console.print(
                f"[bold green]done[/] in {time.monotonic() - started:.1f}s: {devices} devices on "
                f"{MODEL_NAME}:{MODEL_VERSION}, {sent} inferences, accuracy {accuracy:.3f}"
            )
            if stay:
                _stay(console, dashboard)
            else:
                console.print(f"{dashboard} (up while the demo runs; `edgefleet demo --stay` keeps it up)")
    finally:
        code = coordinator.stop()
        if code not in (0, None):
            console.print(f"[yellow]coordinator exited with {code}; see {coordinator.data_dir / 'coordinator.log'}")


def _dashboard_line(client: ApiClient) -> str:
    """The dashboard's URL and a viewer token of its own to sign in with (created for this demo)."""
    name = f"demo-viewer-{secrets.token_hex(3)}"  # a new one per run: a kept --data-dir has the previous ones
    token = client.post_json("/tokens", {"name": name, "role": "viewer"})["token"]
    return f"dashboard {client.url}/ui/  sign in with the viewer token {token}"


def _stay(console: Console, dashboard: str) -> None:
    """Keep everything up (the caller's coordinator and fleet) until Ctrl-C or SIGTERM, then return."""
    console.print(f"[bold]{dashboard}[/]")
    console.print("coordinator and fleet stay up; Ctrl-C stops them")
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.getsignal(number) for number in signals}
    # Both end the wait the same way, so the fleet and the coordinator are stopped by the callers' cleanup: a
    # SIGTERM (a service manager) would otherwise leave the coordinator process behind, and a shell starts a
    # background job with SIGINT ignored.
    for number in signals:
        signal.signal(number, signal.default_int_handler)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        console.print("stopping the fleet and the coordinator ...")
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _print_variants(console: Console, directory: Path) -> None:
    """One line per accepted variant (size against fp32, accuracy, agreement), then the refused ones."""
    manifest = read_manifest(directory)
    base = manifest.primary
    for v in manifest.variants:
        console.print(
            f"    {v.name:<13} {v.format.value:<7} {v.size:>7} B ({v.size / base.size:4.2f}x)  "
            f"accuracy {v.accuracy or 0:.3f}  agreement {v.agreement or 0:.3f}"
        )
    for refused in manifest.refused:
        console.print(f"    [yellow]refused[/] {refused.name}: {refused.reason}")


def _wait_for_enrolment(client: ApiClient, device_ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    wanted = set(device_ids)
    while time.monotonic() < deadline:
        known = {d["id"] for d in client.devices() if d.get("status") == "online"}
        if wanted <= known:
            return
        time.sleep(0.2)
    raise DemoError(f"only {len(wanted & known)} of {len(wanted)} devices enrolled within {timeout:.0f}s")


def _watch_deployment(console: Console, client: ApiClient, deployment_id: Any, total: int, timeout: float) -> None:
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


def _wait_for_telemetry(client: ApiClient, traffic: list[DeviceTraffic], timeout: float) -> dict[str, Any]:
    expected = sum(t.sent - t.errors for t in traffic)
    deadline = time.monotonic() + timeout
    while True:
        summary = client.fleet_summary()
        counted = sum(int(d.get("inference_count", 0)) for d in summary.get("devices", []))
        if counted >= expected or time.monotonic() > deadline:
            return summary
        time.sleep(0.2)


def _summary_table(summary: dict[str, Any], traffic: list[DeviceTraffic], kinds: dict[str, str]) -> Table:
    sent = {t.device_id: t for t in traffic}
    table = Table(show_lines=False)
    for column in ("device", "kind", "model", "variant", "inferences", "errors", "p50 ms", "p95 ms", "accuracy"):
        table.add_column(column, justify="left" if column in {"device", "kind", "model", "variant"} else "right")
    for device in summary.get("devices", []):
        ident = device.get("device_id") or device.get("id")
        local = sent.get(str(ident))
        model = f"{device.get('model_name') or '-'}:{device.get('model_version') or '-'}"
        table.add_row(
            str(ident),
            kinds.get(str(ident), "-"),
            model,
            str(device.get("variant") or "-"),
            str(device.get("inference_count", 0)),
            str(device.get("error_count", 0)),
            _ms(device.get("latency_p50_ms")),
            _ms(device.get("latency_p95_ms")),
            f"{local.accuracy:.2f}" if local else "-",
        )
    return table


def _ms(value: Any) -> str:
    return "-" if value is None else f"{float(value):.2f}"
