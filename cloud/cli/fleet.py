"""`edgefleet fleet ...`: fleet-wide views."""

from __future__ import annotations

from typing import Any

import typer

from cloud.cli._common import JsonOpt, TokenOpt, UrlOpt, api_errors, connect, emit, table

__all__ = ["fleet_app"]

fleet_app = typer.Typer(help="Fleet-wide views.", no_args_is_help=True)


@fleet_app.command("summary")
def fleet_summary(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Per device: version, inferences, errors and latency p50/p95 from telemetry."""
    with api_errors():
        body = connect(url, token).get("/fleet/summary")
    rows = [
        (
            d["device_id"],
            d["status"],
            f"{d['model_name']}:{d['model_version']}" if d.get("model_name") else None,
            d.get("variant"),
            d["inference_count"],
            d["error_count"],
            d.get("latency_p50_ms"),
            d.get("latency_p95_ms"),
            _telemetry_health(d),
        )
        for d in body["devices"]
    ]
    rows.append(
        (
            "total",
            _connectivity(body),
            None,
            None,
            body["inference_count"],
            body["error_count"],
            body.get("latency_p50_ms"),
            body.get("latency_p95_ms"),
            None,
        )
    )
    columns = ["device", "status", "model", "variant", "inferences", "errors", "p50 ms", "p95 ms", "telemetry lost"]
    emit(body, as_json, lambda _: table("fleet", columns, rows))


def _connectivity(body: dict[str, Any]) -> str:
    """`7/10 online`, plus how many are `unknown` (not heard from since the coordinator started)."""
    line = f"{body['online_count']}/{body['device_count']} online"
    unknown = body.get("unknown_count") or 0
    return f"{line}, {unknown} unknown" if unknown else line


def _telemetry_health(line: dict[str, Any]) -> str | None:
    """`2 gaps, 5 dropped` when telemetry of the device was lost; nothing when all of it arrived."""
    parts = []
    if line.get("telemetry_gaps"):
        parts.append(f"{line['telemetry_gaps']} gap{'s' if line['telemetry_gaps'] > 1 else ''}")
    if line.get("telemetry_dropped"):
        parts.append(f"{line['telemetry_dropped']} dropped")
    return ", ".join(parts) or None
