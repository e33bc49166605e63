"""`edgefleet fleet ...`: fleet-wide views."""

from __future__ import annotations

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
        )
        for d in body["devices"]
    ]
    rows.append(
        (
            "total",
            f"{body['online_count']}/{body['device_count']} online",
            None,
            None,
            body["inference_count"],
            body["error_count"],
            body.get("latency_p50_ms"),
            body.get("latency_p95_ms"),
        )
    )
    columns = ["device", "status", "model", "variant", "inferences", "errors", "p50 ms", "p95 ms"]
    emit(body, as_json, lambda _: table("fleet", columns, rows))
