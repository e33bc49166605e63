"""`edgefleet deploy` and `edgefleet deployments ...`: set the desired model of devices and follow the progress."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cloud.cli._common import JsonOpt, TokenOpt, UrlOpt, api_errors, connect, counts, emit, fail, table

__all__ = ["deploy", "deployments_app", "parse_targets"]

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
    model: Annotated[str, typer.Argument(metavar="NAME:VERSION", help="Model version to deploy, e.g. digits:1.0.")],
    to: Annotated[list[str], typer.Option("--to", help="A device id, or tag=value; repeat for more (tags are ANDed).")],
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Deploy NAME:VERSION to devices chosen by id or by tags."""
    name, sep, version = model.partition(":")
    if not sep or not name or not version:
        fail(f"model must be NAME:VERSION, got {model!r}")
    try:
        target = parse_targets(to)
    except ValueError as exc:
        fail(str(exc))
    with api_errors():
        body = connect(url, token).post_json("/deployments", {"model": name, "version": version, "target": target})
    emit(body, as_json, lambda b: f"deployment {b['id']}: {name}:{version} to {len(b['targets'])} device(s)")


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
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one deployment's per-device progress and failure reasons."""
    with api_errors():
        body = connect(url, token).get(f"/deployments/{deployment_id}")
    rows = [
        (
            t["device_id"],
            t["generation"],
            t["status"],
            t.get("phase"),
            f"{t['error_code']}: {t.get('error_message') or ''}" if t.get("error_code") else None,
        )
        for t in body["targets"]
    ]
    title = f"deployment {body['id']}: {body['model_name']}:{body['model_version']} ({body['status']})"
    emit(body, as_json, lambda _: table(title, ["device", "generation", "status", "phase", "error"], rows))
