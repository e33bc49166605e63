"""`edgefleet deploy` and `edgefleet deployments ...`: set the desired model of devices and follow the progress."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from cloud.cli._common import JsonOpt, TokenOpt, UrlOpt, api_errors, connect, counts, emit, fail, parse_model_ref, table
from cloud.client import ApiClient

__all__ = ["SETTLING", "deploy", "deployments_app", "parse_targets", "render_deployment"]

# The status of a deployment while any device has not settled (`cloud.services.deployments.deployment_status`).
SETTLING = "in_progress"

deployments_app = typer.Typer(help="Deployments and their per-device progress.", no_args_is_help=True)


def parse_targets(targets: list[str]) -> dict[str, Any]:
    """`--to` values → a deployment target: all `key=value` (tags, ANDed) or all device ids."""
    tags = dict(t.split("=", 1) for t in targets if "=" in t)
    ids = [t for t in targets if "=" not in t]
    if tags and ids:
        raise ValueError("--to mixes device ids and tag=value selectors; use one kind per deployment")
    if not targets:
        raise ValueError("give at least one --to (a device id or tag=value)")
    return {"tags": tags} if tags else {"device_ids": ids}


def deploy(
    model: Annotated[
        str,
        typer.Argument(
            metavar="NAME:VERSION|NAME@ALIAS",
            help="Model version to deploy, e.g. digits:1.0, or the one an alias names now: digits@production.",
        ),
    ],
    to: Annotated[list[str], typer.Option("--to", help="A device id, or tag=value; repeat for more (tags are ANDed).")],
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Deploy NAME:VERSION (or NAME@ALIAS, resolved now and recorded) to devices chosen by id or by tags."""
    try:
        ref = parse_model_ref(model)
        target = parse_targets(to)
    except ValueError as exc:
        fail(str(exc))
    body: dict[str, Any] = {"model": str(ref) if ref.alias else ref.name, "target": target}
    if ref.version:
        body["version"] = ref.version
    with api_errors():
        answer = connect(url, token).post_json("/deployments", body)
    emit(answer, as_json, _created_line)


def _created_line(b: dict[str, Any]) -> str:
    via = f" (via @{b['model_alias']})" if b.get("model_alias") else ""
    return f"deployment {b['id']}: {b['model_name']}:{b['model_version']}{via} to {len(b['targets'])} device(s)"


@deployments_app.command("list")
def deployments_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List deployments, newest first."""
    with api_errors():
        body = connect(url, token).get("/deployments")
    rows = [
        (d["id"], f"{d['model_name']}:{d['model_version']}", d["status"], counts(d["counts"]), d["created_at"])
        for d in body["data"]
    ]
    emit(body, as_json, lambda _: table("deployments", ["id", "model", "status", "targets", "created"], rows))


@deployments_app.command("show")
def deployments_show(
    deployment_id: Annotated[int, typer.Argument(metavar="ID", help="Deployment id.")],
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Follow it until every device settled.")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.05, help="Seconds between refreshes.")] = 1.0,
    timeout: Annotated[float, typer.Option("--timeout", help="Stop watching after this many seconds.")] = 3600.0,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one deployment's per-device progress and failure reasons; with --watch, live until it settles
    (--json: one line per change). With --watch, exits 1 if a device failed or it is still in progress after
    --timeout, so that scripts can wait on it."""
    client = connect(url, token)
    with api_errors():
        body = client.deployment(deployment_id)
    if not watch:
        emit(body, as_json, render_deployment)
        return
    watch_until_settled = _watch_json if as_json else _watch_live
    _require_success(watch_until_settled(client, deployment_id, body, interval, timeout))


def _require_success(body: dict[str, Any]) -> None:
    """A settled deployment with failed devices is a failure of the command (the table above says why)."""
    failed = int(body["counts"].get("failed", 0))
    if failed:
        fail(f"deployment {body['id']} settled with {failed} device(s) failed: {counts(body['counts'])}")


def render_deployment(body: dict[str, Any]) -> Table:
    """The deployment's targets: device, generation, status, phase, error (device ids whole)."""
    rows = [
        (
            t["device_id"],
            t["generation"],
            t["status"],
            t.get("phase"),
            f"{t['error_code']}: {t.get('error_message') or ''}" if t.get("error_code") else t.get("error_message"),
        )
        for t in body["targets"]
    ]
    via = f" via @{body['model_alias']}" if body.get("model_alias") else ""
    title = (
        f"deployment {body['id']}: {body['model_name']}:{body['model_version']}{via} "
        f"({body['status']}; {counts(body['counts'])})"
    )
    return table(title, ["device", "generation", "status", "phase", "error"], rows, whole=["device"])


def _settled(body: dict[str, Any]) -> bool:
    return body["status"] != SETTLING


def _watch_live(
    client: ApiClient, deployment_id: int, body: dict[str, Any], interval: float, timeout: float
) -> dict[str, Any]:
    """Redraw the deployment in place until it settles (or `timeout`); the settled deployment."""
    deadline = time.monotonic() + timeout
    with Live(render_deployment(body), console=Console(highlight=False), refresh_per_second=4) as live:
        while not _settled(body) and time.monotonic() < deadline:
            time.sleep(interval)
            with api_errors():
                body = client.deployment(deployment_id)
            live.update(render_deployment(body))
    if not _settled(body):
        fail(f"deployment {deployment_id} is still {body['status']} after {timeout:g}s")
    return body


def _watch_json(
    client: ApiClient, deployment_id: int, body: dict[str, Any], interval: float, timeout: float
) -> dict[str, Any]:
    """One JSON line per change of status or per-device counts, until the deployment settles; the settled one."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        key = (body["status"], json.dumps(body["counts"], sort_keys=True))
        if key != last:
            typer.echo(json.dumps({k: body[k] for k in ("id", "status", "counts")}, sort_keys=True))
            last = key
        if _settled(body) or time.monotonic() >= deadline:
            break
        time.sleep(interval)
        with api_errors():
            body = client.deployment(deployment_id)
    if not _settled(body):
        fail(f"deployment {deployment_id} is still {body['status']} after {timeout:g}s")
    return body
