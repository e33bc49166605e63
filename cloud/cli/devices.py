"""`edgefleet devices ...`: the devices the coordinator knows, with their reported state."""

from __future__ import annotations

from typing import Any

import typer

from cloud.cli._common import JsonOpt, UrlOpt, api_errors, connect, emit, table

__all__ = ["devices_app"]

devices_app = typer.Typer(help="Devices known to the coordinator.", no_args_is_help=True)


@devices_app.command("list")
def devices_list(url: UrlOpt = None, as_json: JsonOpt = False) -> None:
    """List devices with their active model and update state."""
    with api_errors():
        body = connect(url, None).get("/devices")
    rows = [_device_row(d) for d in body["data"]]
    columns = ["id", "status", "model", "phase", "generation", "tags", "inferences", "last error", "last seen"]
    emit(body, as_json, lambda _: table("devices", columns, rows))


def _device_row(d: dict[str, Any]) -> list[Any]:
    model = f"{d['active_model_name']}:{d['active_model_version']}" if d.get("active_model_name") else None
    generation = f"{d.get('reported_generation')}/{d.get('desired_generation')}"
    tags = ",".join(f"{k}={v}" for k, v in sorted((d.get("tags") or {}).items())) or None
    error = f"{d['last_error_code']}: {d.get('last_error_message') or ''}" if d.get("last_error_code") else None
    return [
        d["id"],
        d["status"],
        model,
        d.get("update_phase"),
        generation,
        tags,
        d.get("inference_count"),
        error,
        d.get("last_seen"),
    ]
