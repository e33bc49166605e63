"""`edgefleet federated ...`: retrain a registered version on the devices' own data with Flower, and follow it.

    edgefleet federated run digits-cnn:1.0 --to site=lab --rounds 5 --strategy fedavg --min-nodes 3 --watch
    edgefleet federated status 7 --watch
    edgefleet federated list --status running
    edgefleet federated stop 7

A run goes pending → running (Flower's rounds) → building (the candidate version is built and pushed) →
completed, or ends failed / stopped (docs/federated.md).
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from cloud.cli._common import JsonOpt, TokenOpt, UrlOpt, api_errors, connect, emit, fail, parse_model_ref, table
from cloud.client import ApiClient
from cloud.federation.params import DEFAULT_PROXIMAL_MU, FederatedRunCreate

__all__ = ["build_run_body", "federated_app", "render_run", "round_rows", "rounds_done"]

federated_app = typer.Typer(
    help="Federated retraining: train a version further on the devices' own data (Flower), then build a candidate.",
    no_args_is_help=True,
)

FINISHED = frozenset({"completed", "failed", "stopped"})
_TRAIN_LOSS = ("train_loss", "train-loss", "loss")
_EVAL_ACC = ("eval_acc", "eval-acc", "eval_accuracy", "accuracy", "acc")


class Strategy(StrEnum):
    """How the devices' updates are aggregated."""

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"


class Rollout(StrEnum):
    """What happens with the candidate once built."""

    CANARY = "canary"


def _default(field: str) -> Any:
    return FederatedRunCreate.model_fields[field].default


def build_run_body(model: str, *, to: list[str], **options: Any) -> dict[str, Any]:
    """The body of `POST /federated/runs` from the command's options (None: the coordinator's default).

    `ValueError` names a bad option.
    """
    ref = parse_model_ref(model)
    selector: dict[str, str] = {}
    for item in to:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--to {item!r}: use tag=value (e.g. --to site=lab); repeat it to AND tags")
        selector[key] = value
    body: dict[str, Any] = {"model": str(ref), "selector": selector}
    eval_data = options.pop("eval_data", None)
    if eval_data is not None:
        body["eval_data"] = str(Path(eval_data).expanduser().resolve())  # the coordinator reads it on its host
    body.update({k: v for k, v in options.items() if v is not None and v is not False})
    return body


def _read_plan(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; `ValueError` naming the file when it is not one."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--rollout-plan {path}: not a JSON file ({exc})") from exc
    if not isinstance(body, dict):
        raise ValueError(f"--rollout-plan {path}: a rollout plan is a JSON object (waves, gates, ...)")
    return body


def _metric(metrics: dict[str, Any], names: tuple[str, ...]) -> float | None:
    for name in names:
        value = metrics.get(name)
        if isinstance(value, int | float):
            return float(value)
    return None


def round_rows(rounds: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """One row per round from the run's progress lines: round, replies, failures, train loss, eval acc. Pure."""
    merged: dict[int, dict[str, Any]] = {}
    for entry in rounds:
        number = entry.get("round")
        if not isinstance(number, int):
            continue
        row = merged.setdefault(number, {})
        metrics = entry.get("metrics") or {}
        if entry.get("phase") == "evaluate":
            row["acc"] = _metric(metrics, _EVAL_ACC)
            row.setdefault("replies", entry.get("replies"))
            row.setdefault("failures", entry.get("failures"))
        else:
            row["loss"] = _metric(metrics, _TRAIN_LOSS)
            row["replies"], row["failures"] = entry.get("replies"), entry.get("failures")
    return [
        (
            number,
            row.get("replies"),
            row.get("failures"),
            None if row.get("loss") is None else f"{row['loss']:.4f}",
            None if row.get("acc") is None else f"{row['acc']:.2%}",
        )
        for number, row in sorted(merged.items())
    ]


def rounds_done(body: dict[str, Any]) -> int:
    """Rounds whose training has been aggregated."""
    return len({r.get("round") for r in body.get("rounds") or [] if r.get("phase", "train") == "train"})


def _total(body: dict[str, Any]) -> int:
    return int((body.get("params") or {}).get("rounds") or 0)


def _settings_line(body: dict[str, Any]) -> str:
    p = body.get("params") or {}
    parts = [
        f"{p.get('strategy', '-')}" + (f" (mu {p['proximal_mu']:g})" if p.get("strategy") == "fedprox" else ""),
        f"{p.get('rounds')} rounds",
        f"min {p.get('min_nodes')} nodes",
        f"{p.get('local_epochs')} local epoch(s)",
        f"lr {p.get('lr')}",
        f"batch {p.get('batch_size')}",
    ]
    if p.get("dp_noise"):
        parts.append(f"DP noise {p['dp_noise']:g} clip {p.get('dp_clip'):g}")
    if p.get("secagg"):
        parts.append("SecAgg+")
    return ", ".join(parts)


def render_run(body: dict[str, Any]) -> RenderableType:
    """A run: status, cohort, settings, a progress bar of rounds, a table per round, candidate and error."""
    selector = ",".join(f"{k}={v}" for k, v in sorted((body.get("selector") or {}).items())) or "the whole fleet"
    flower = f" (Flower run {body['flower_run_id']})" if body.get("flower_run_id") else ""
    head = Text.assemble(
        (f"federated run {body['id']}", "bold"),
        f" {body['model_name']}:{body['parent_version']} — ",
        (body["status"], "bold"),
        flower,
    )
    devices = body.get("devices") or []
    parts: list[RenderableType] = [
        head,
        Text(f"cohort: {len(devices)} devices of {selector}: {', '.join(devices) or '-'}"),
        Text(f"settings: {_settings_line(body)}"),
    ]
    total, done = _total(body), rounds_done(body)
    bar = Table.grid(padding=(0, 1))
    bar.add_row(ProgressBar(total=max(total, 1), completed=min(done, total), width=30), Text(f"{done}/{total} rounds"))
    parts.append(bar)
    rows = round_rows(body.get("rounds") or [])
    if rows:
        parts.append(table("rounds", ["round", "replies", "failures", "train loss", "eval acc"], rows))
    if body.get("candidate_version"):
        rollout = f", canary rollout {body['rollout_id']}" if body.get("rollout_id") else ""
        parts.append(Text(f"candidate: {body['model_name']}:{body['candidate_version']}{rollout}"))
    summary = body.get("summary") or {}
    if summary.get("epsilon") is not None:
        parts.append(Text(f"differential privacy: epsilon {summary['epsilon']:.3g}"))
    if body.get("error"):
        parts.append(Text.assemble(("error: ", "red"), str(body["error"])))
    return Group(*parts)


def _created_line(body: dict[str, Any]) -> str:
    devices = body.get("devices") or []
    return (
        f"federated run {body['id']}: {body['model_name']}:{body['parent_version']} on {len(devices)} devices "
        f"({', '.join(devices)}), {_total(body)} rounds — {body['status']}"
    )


@federated_app.command("run")
def run(
    model: Annotated[
        str,
        typer.Argument(
            metavar="NAME:VERSION|NAME@ALIAS",
            help="The version to train further (it needs a trainable form: `edgefleet models push --trainable`).",
        ),
    ],
    to: Annotated[
        list[str] | None,
        typer.Option("--to", help="tag=value the devices carry; repeat to AND tags. Default: the whole fleet."),
    ] = None,
    rounds: Annotated[
        int | None, typer.Option("--rounds", min=1, max=100, help=f"Federated rounds (default: {_default('rounds')}).")
    ] = None,
    strategy: Annotated[
        Strategy | None,
        typer.Option("--strategy", help=f"Aggregation (default: {_default('strategy')})."),
    ] = None,
    min_nodes: Annotated[
        int | None,
        typer.Option(
            "--min-nodes",
            min=2,
            help="Eligible devices needed to start, and replies each round waits for "
            f"(default: {_default('min_nodes')}).",
        ),
    ] = None,
    local_epochs: Annotated[
        int | None,
        typer.Option(
            "--local-epochs", min=1, help=f"Epochs per round on each device (default: {_default('local_epochs')})."
        ),
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help=f"Learning rate (default: {_default('lr')}).")] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", min=1, help=f"Batch size on devices (default: {_default('batch_size')})."),
    ] = None,
    proximal_mu: Annotated[
        float | None,
        typer.Option("--proximal-mu", help=f"FedProx's proximal term, fedprox only (default: {DEFAULT_PROXIMAL_MU})."),
    ] = None,
    dp_noise: Annotated[
        float | None,
        typer.Option("--dp-noise", help="Client-side differential privacy: noise multiplier (needs --dp-clip)."),
    ] = None,
    dp_clip: Annotated[
        float | None, typer.Option("--dp-clip", help="Client-side differential privacy: clipping norm of each update.")
    ] = None,
    secagg: Annotated[
        bool, typer.Option("--secagg", help="Secure aggregation (SecAgg+); needs --min-nodes 3 or more.")
    ] = False,
    round_timeout: Annotated[
        float | None,
        typer.Option(
            "--round-timeout",
            help=f"Seconds a round waits for replies before aggregating (default: {_default('round_timeout_s'):g}).",
        ),
    ] = None,
    min_samples: Annotated[
        int | None,
        typer.Option(
            "--min-samples",
            min=1,
            help=f"Labelled samples a device needs to train in a round (default: {_default('min_samples')}).",
        ),
    ] = None,
    eval_fraction: Annotated[
        float | None,
        typer.Option(
            "--eval-fraction",
            min=0.01,
            max=0.99,
            help="Share of each device's labelled samples held out to evaluate every round "
            f"(default: {_default('eval_fraction'):g}).",
        ),
    ] = None,
    eval_data: Annotated[
        Path | None,
        typer.Option(
            "--eval-data",
            help="Held-out data (npz/npy/csv) on the coordinator host that the candidate is evaluated on.",
        ),
    ] = None,
    rollout: Annotated[
        Rollout | None, typer.Option("--rollout", help="canary: start a canary rollout of the candidate when built.")
    ] = None,
    rollout_plan: Annotated[
        Path | None,
        typer.Option(
            "--rollout-plan",
            exists=True,
            dir_okay=False,
            readable=True,
            help="JSON overrides of the canary plan (waves, gates, on_gate_failure, as in `rollouts create`); "
            "default: 1 device, then all, 10 minutes' bake each, rolled back on a failed gate.",
        ),
    ] = None,
    max_accuracy_drop: Annotated[
        float | None,
        typer.Option(
            "--max-accuracy-drop",
            min=0,
            max=1,
            help="Accuracy gate against the parent on the evaluation data; a candidate that loses more is "
            f"registered but not rolled out (default: {_default('max_accuracy_drop'):g}).",
        ),
    ] = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Follow the run until it ends (see `status`).")] = False,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between refreshes with --watch.")] = 2.0,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a federated run of NAME:VERSION on the devices that match --to, and print its id.

    Eligible devices are enrolled, online, run exactly this version, are not updating, and have a registered
    SuperNode; fewer than --min-nodes is refused with the count of each reason. The trained model becomes a new
    version (its lineage names this run); --rollout canary also starts a canary rollout of it.

    Example: edgefleet federated run digits-cnn:1.0 --to site=lab --rounds 5 --strategy fedprox --min-nodes 3
    """
    try:
        body = build_run_body(
            model,
            to=to or [],
            rounds=rounds,
            strategy=strategy.value if strategy else None,
            min_nodes=min_nodes,
            local_epochs=local_epochs,
            lr=lr,
            batch_size=batch_size,
            proximal_mu=proximal_mu,
            dp_noise=dp_noise,
            dp_clip=dp_clip,
            secagg=secagg,
            round_timeout_s=round_timeout,
            min_samples=min_samples,
            eval_fraction=eval_fraction,
            eval_data=eval_data,
            rollout=rollout.value if rollout else None,
            rollout_plan=_read_plan(rollout_plan) if rollout_plan is not None else None,
            max_accuracy_drop=max_accuracy_drop,
        )
    except ValueError as exc:
        fail(str(exc))
    client = connect(url, token)
    with api_errors():
        created = client.create_federated_run(body)
    if not watch:
        emit(created, as_json, _created_line)
        return
    if not as_json:
        Console(highlight=False).print(_created_line(created))
    _watch(client, int(created["id"]), created, interval, as_json)


@federated_app.command("status")
def status(
    run_id: Annotated[int, typer.Argument(metavar="ID", help="Federated run id.")],
    watch: Annotated[
        bool,
        typer.Option(
            "--watch", "-w", help="Refresh until the run ends; exit 0 when completed, 1 when failed or stopped."
        ),
    ] = False,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between refreshes.")] = 2.0,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a run: status, cohort, settings, rounds done (and per round: replies, failures, train loss, eval
    accuracy), the candidate version and rollout, and the error of a run that failed."""
    client = connect(url, token)
    with api_errors():
        body = client.federated_run(run_id)
    if not watch:
        emit(body, as_json, render_run)
        return
    _watch(client, run_id, body, interval, as_json)


def _watch(client: ApiClient, run_id: int, body: dict[str, Any], interval: float, as_json: bool) -> None:
    """Follow a run until it ends; exit 0 when it completed, 1 when it failed or was stopped."""
    if as_json:
        last: Any = None
        while True:
            key = (body["status"], rounds_done(body))
            if key != last:
                line = {k: body.get(k) for k in ("id", "status", "candidate_version", "rollout_id", "error")}
                typer.echo(json.dumps(line | {"rounds_done": key[1]}, sort_keys=True))
                last = key
            if body["status"] in FINISHED:
                break
            time.sleep(interval)
            with api_errors():
                body = client.federated_run(run_id)
    else:
        with Live(render_run(body), console=Console(highlight=False), refresh_per_second=4) as live:
            while body["status"] not in FINISHED:
                time.sleep(interval)
                with api_errors():
                    body = client.federated_run(run_id)
                live.update(render_run(body))
    if body["status"] != "completed":
        raise typer.Exit(1)


@federated_app.command("list")
def list_(
    model: Annotated[str | None, typer.Option("--model", help="Only runs of this model.")] = None,
    status_: Annotated[
        str | None,
        typer.Option(
            "--status", help="Only runs in this status: pending, running, building, completed, failed, stopped."
        ),
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List federated runs, newest first."""
    with api_errors():
        data = connect(url, token).federated_runs(model=model, status=status_)
    rows = [
        (
            r["id"],
            f"{r['model_name']}:{r['parent_version']}",
            r["status"],
            f"{rounds_done(r)}/{_total(r)}",
            len(r.get("devices") or []),
            r.get("candidate_version"),
            r["created_at"],
            (r.get("error") or "")[:80] or None,
        )
        for r in data
    ]
    columns = ["id", "model", "status", "rounds", "devices", "candidate", "created", "error"]
    emit({"data": data, "count": len(data)}, as_json, lambda _: table("federated runs", columns, rows, whole=["id"]))


@federated_app.command("stop")
def stop(
    run_id: Annotated[int, typer.Argument(metavar="ID", help="Federated run id.")],
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop a run that has not finished: cancel it before it starts, stop its Flower run, or end the building of
    its candidate."""
    with api_errors():
        body = connect(url, token).stop_federated_run(run_id)
    emit(body, as_json, lambda b: f"federated run {b['id']}: {b['status']}")
