"""`edgefleet demo --federated`: federated retraining start to finish on a small cohort (about five minutes).

A coordinator with a supervised SuperLink (`edgefleet up --federated`), six real agents each running a Flower
SuperNode with its enrolment key: `site=noisy` (4 devices whose camera adds noise to half of what it sees)
and `site=clean` (2). The reference CNN is compressed, pushed with its trainable form and deployed; local
applications feed labels back for what the devices served (kept in each device's sample store, never sent
anywhere); `edgefleet federated run --to site=noisy --rollout canary` retrains on the noisy cohort; the candidate
is compressed, gated against the parent, signed and rolled out in two waves against the parent as control.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cloud.client import ApiClient
from simulators.coordinator import CoordinatorProcess
from simulators.drift import Drift
from simulators.fleet import FleetConfig, SimulatedFleet
from simulators.traffic import send_labelled_traffic

__all__ = ["FederatedDemoError", "run_federated_demo"]

MODEL_NAME, PARENT = "digits-cnn", "1.0.0"
NOISE = Drift("noise", 0.5)
ROUNDS = 3
INPUT_SHAPE = (1, 8, 8)


class FederatedDemoError(RuntimeError):
    """A step of the federated demo did not reach its goal in time."""


def _edgefleet(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "edgefleet"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def _checked(result: subprocess.CompletedProcess[str], what: str) -> str:
    if result.returncode != 0:
        raise FederatedDemoError(f"{what} failed ({result.returncode}): {(result.stderr or result.stdout)[-1500:]}")
    return result.stdout


def _images(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(-1, *INPUT_SHAPE), dtype=np.float32)


def _wait(condition: Any, timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise FederatedDemoError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})
    return float((np.asarray(logits).argmax(1) == y).mean())


def run_federated_demo(console: Console, root: Path, *, timeout: float = 900.0) -> None:
    """The demo's steps; raises `FederatedDemoError` (or the client's / coordinator's errors) on a failure."""
    from compression.reference import load_digits_split

    started = time.monotonic()
    coordinator = CoordinatorProcess(root / "coordinator", federated=True)
    console.print("[bold]1/7[/] starting the coordinator with a supervised Flower SuperLink (TLS, node auth) ...")
    client = coordinator.start()
    try:
        location = dict(client.get("/enrolment/federation"))
        console.print(f"    coordinator {client.url}   SuperLink {location['superlink']}")
        console.print(
            "[bold]2/7[/] training the reference CNN and compressing it (fp32, int8), with its trainable form"
        )
        compressed = root / "compressed"
        _checked(
            _edgefleet("compress", MODEL_NAME, "--out", str(compressed), "--to", "int8-static", "--no-memory"),
            "edgefleet compress",
        )
        _checked(
            _edgefleet(
                "models", "push", "--variants", str(compressed), "--name", MODEL_NAME, "--version", PARENT,
                "--url", client.url, "--token", str(client.token),
            ),
            "edgefleet models push",
        )  # fmt: skip
        with _fleet(client, root, "noisy", 4) as noisy, _fleet(client, root, "clean", 2) as clean:
            console.print("[bold]3/7[/] 6 agents enrolled; each runs a Flower SuperNode with its enrolment key")
            _wait(
                lambda: (
                    {d["id"] for d in client.devices() if d.get("status") == "online"}
                    >= set(noisy.device_ids + clean.device_ids)
                ),
                120,
                "the devices to come online",
            )
            for fleet in (noisy, clean):
                deployed = client.deploy(model=MODEL_NAME, version=PARENT, tags={"fleet": fleet.config.id_prefix})
                _wait(
                    lambda d=deployed: {t["status"] for t in client.deployment(d["id"])["targets"]} == {"succeeded"},
                    timeout,
                    f"{MODEL_NAME}:{PARENT} on fleet {fleet.config.id_prefix}",
                )
            console.print(f"[bold]4/7[/] {MODEL_NAME}:{PARENT} serves everywhere; local apps label what it served")
            split = load_digits_split()
            rng = np.random.default_rng(5)
            blurred = rng.random(len(split.x_train)) < 0.5
            x_noisy = np.where(blurred[:, None], NOISE.apply(split.x_train, np.random.default_rng(1)), split.x_train)
            kept = 0
            for i, agent in enumerate(noisy.agents):
                part = slice(i, None, len(noisy.agents))
                kept += send_labelled_traffic(agent, _images(x_noisy[part]), split.y_train[part])
            for i, agent in enumerate(clean.agents):
                part = slice(i, None, 3)
                kept += send_labelled_traffic(agent, _images(split.x_train[part]), split.y_train[part])
            console.print(f"    {kept} labelled samples kept in the devices' own sample stores (never uploaded)")

            console.print(f"[bold]5/7[/] edgefleet federated run --to site=noisy --rounds {ROUNDS} --rollout canary")
            plan = root / "canary.json"
            plan.write_text(
                json.dumps(
                    {
                        "waves": [{"count": 1, "bake_seconds": 10}, {"percent": 100, "bake_seconds": 10}],
                        # p95 ratio 3 rather than 1.25: six agents and a SuperLink share two cores here
                        "gates": {"min_inferences": 100, "min_class_samples": 100, "max_p95_latency_ratio": 3.0},
                    }
                )
            )
            created = _checked(
                _edgefleet(
                    "federated", "run", f"{MODEL_NAME}:{PARENT}", "--to", "site=noisy", "--rounds", str(ROUNDS),
                    "--min-nodes", "3", "--local-epochs", "3", "--lr", "0.01", "--max-accuracy-drop", "0.08",
                    "--rollout", "canary", "--rollout-plan", str(plan),
                    "--url", client.url, "--token", str(client.token), "--json",
                ),
                "edgefleet federated run",
            )  # fmt: skip
            run = _watch_run(console, client, int(json.loads(created)["id"]), timeout)
            candidate = str(run["candidate_version"])
            x_test_noisy = _images(NOISE.apply(split.x_test, np.random.default_rng(2)))
            before = _accuracy(_artifact(root, client, PARENT), x_test_noisy, split.y_test)
            after = _accuracy(_artifact(root, client, candidate), x_test_noisy, split.y_test)
            clean_before = _accuracy(_artifact(root, client, PARENT), _images(split.x_test), split.y_test)
            clean_after = _accuracy(_artifact(root, client, candidate), _images(split.x_test), split.y_test)
            version = client.model_version(MODEL_NAME, candidate)
            lineage, variants = version["lineage"], ", ".join(v["name"] for v in version["variants"])
            console.print(
                f"[bold]6/7[/] candidate {MODEL_NAME}:{candidate} (lineage: parent {lineage['parent_version']}, "
                f"run {lineage['run']}; {version['signing_state']}; variants {variants})"
            )
            console.print(
                f"    accuracy on noisy held-out digits {before:.3f} → {after:.3f}; on clean ones "
                f"{clean_before:.3f} → {clean_after:.3f}"
            )
            console.print(f"[bold]7/7[/] canary rollout {run['rollout_id']} on site=noisy, the parent as control ...")
            rollout = _watch_rollout(client, noisy, int(run["rollout_id"]), x_test_noisy, timeout)
            versions = sorted({a.active_model.version for a in noisy.agents if a.active_model})
            others = sorted({a.active_model.version for a in clean.agents if a.active_model})
            console.print(f"    rollout {rollout['status']}: site=noisy runs {versions}, site=clean keeps {others}")
        console.print(f"[bold green]done[/] in {time.monotonic() - started:.1f}s")
    finally:
        code = coordinator.stop()
        if code not in (0, None):
            console.print(f"[yellow]coordinator exited with {code}; see {coordinator.data_dir / 'coordinator.log'}")


def _fleet(client: ApiClient, root: Path, site: str, devices: int) -> SimulatedFleet:
    config = FleetConfig(
        devices=devices,
        data_root=root / site,
        coordinator_url=client.url,
        api_token=client.token,
        id_prefix=site,
        tags={"site": site},
        telemetry_interval_s=2.0,
        federated=True,
        sample_rates={MODEL_NAME: 1.0},
    )
    return SimulatedFleet(config)


def _artifact(root: Path, client: ApiClient, version: str) -> Path:
    """The version's fp32 model from the coordinator's content-addressed store (this demo runs beside it)."""
    sha256 = client.model_version(MODEL_NAME, version)["sha256"]
    return root / "coordinator" / "artifacts" / sha256[:2] / sha256


def _watch_run(console: Console, client: ApiClient, run_id: int, timeout: float) -> dict[str, Any]:
    columns = (TextColumn("    rounds"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"))
    deadline = time.monotonic() + timeout
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("", total=ROUNDS)
        while True:
            run = client.federated_run(run_id)
            rounds = [r for r in run.get("rounds", []) if r.get("phase") == "evaluate"]
            accuracy = rounds[-1].get("metrics", {}).get("eval_acc") if rounds else None
            note = run["status"] + (f", held-out accuracy on the devices {accuracy:.3f}" if accuracy else "")
            progress.update(task, completed=len(rounds), description=note)
            if run["status"] in ("completed", "failed", "stopped"):
                break
            if time.monotonic() > deadline:
                raise FederatedDemoError(f"federated run {run_id} still {run['status']} after {timeout:.0f}s")
            time.sleep(1.0)
    if run["status"] != "completed":
        raise FederatedDemoError(f"federated run {run_id} {run['status']}: {run.get('error')}")
    return run


def _watch_rollout(
    client: ApiClient, fleet: SimulatedFleet, rollout_id: int, x: np.ndarray, timeout: float
) -> dict[str, Any]:
    """Traffic on the cohort while the canary bakes (its gates need inferences), until the rollout ends."""
    stop = threading.Event()

    def drive() -> None:
        while not stop.is_set():
            for agent in fleet.agents:
                with suppress(Exception):  # a device mid-update serves no model for a moment
                    agent.infer({"input": x[:16]})
            time.sleep(0.02)

    traffic = threading.Thread(target=drive, daemon=True)
    traffic.start()
    try:
        _wait(
            lambda: client.rollout(rollout_id)["status"] in ("completed", "rolled_back", "aborted"),
            timeout,
            f"rollout {rollout_id}",
        )
    finally:
        stop.set()
        traffic.join(10)
    rollout = client.rollout(rollout_id)
    if rollout["status"] != "completed":
        raise FederatedDemoError(f"rollout {rollout_id} {rollout['status']}: {rollout.get('state', {}).get('reason')}")
    return rollout
