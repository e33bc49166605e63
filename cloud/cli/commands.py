"""Operator commands against a running coordinator: models, devices, deploy, deployments, fleet."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cloud.cli._common import JsonOpt, TokenOpt, UrlOpt, api_errors, connect, emit, fail, table

__all__ = ["deploy", "deployments_app", "devices_app", "fleet_app", "models_app", "parse_targets"]

models_app = typer.Typer(help="Push and list model versions in the registry.", no_args_is_help=True)
devices_app = typer.Typer(help="Devices known to the coordinator.", no_args_is_help=True)
deployments_app = typer.Typer(help="Deployments and their per-device progress.", no_args_is_help=True)
fleet_app = typer.Typer(help="Fleet-wide views.", no_args_is_help=True)


@models_app.command("push")
def models_push(
    file: Annotated[
        Path | None,
        typer.Argument(exists=True, dir_okay=False, readable=True, help="Model file (optional with --variants)."),
    ] = None,
    name: Annotated[str, typer.Option("--name", "-n", help="Model name.")] = "",
    version: Annotated[str, typer.Option("--version", "-v", help="Version, e.g. 1.0.")] = "",
    format: Annotated[str, typer.Option("--format", help="Model format (onnx, tflite).")] = "onnx",
    inputs: Annotated[
        str | None, typer.Option(help="JSON list of TensorSpec; derived from the ONNX graph if omitted.")
    ] = None,
    outputs: Annotated[str | None, typer.Option(help="JSON list of TensorSpec.")] = None,
    variants: Annotated[
        Path | None,
        typer.Option(
            "--variants",
            exists=True,
            file_okay=False,
            help="Directory written by `edgefleet compress` (variants.json): register every variant under this "
            "version; its fp32 model is the primary unless FILE is given.",
        ),
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload FILE as NAME:VERSION, or a compressed model's variants (--variants DIR) under one version."""
    if not name or not version:
        fail("--name and --version are required")
    if file is None and variants is None:
        fail("give a model FILE, or --variants DIR from `edgefleet compress`")
    client = connect(url, token)
    entries = _manifest_entries(variants) if variants is not None else []
    primary = next((e for e in entries if e["name"] == "fp32"), entries[0] if entries else None)
    fields: dict[str, str] = {"format": format}
    if file is None:
        assert variants is not None and primary is not None
        file = variants / primary["file"]
        fields = _variant_fields(primary)
    if inputs is not None:
        fields["inputs"] = inputs
    if outputs is not None:
        fields["outputs"] = outputs
    allowed = {"format", "inputs", "outputs", "variant"}
    with api_errors():
        body = client.push_model(
            file, name=name, version=version, fields={k: v for k, v in fields.items() if k in allowed}
        )
        for entry in entries:
            if entry["sha256"] == body["sha256"]:
                continue  # the primary itself
            assert variants is not None
            body = client.add_variant(
                variants / entry["file"], name=name, version=version, fields=_variant_fields(entry)
            )
            if not as_json:
                typer.echo(f"  + variant {entry['name']} ({entry['format']}, {entry['precision']}, {entry['size']} B)")
    emit(
        body,
        as_json,
        lambda b: (
            f"pushed {b['name']}:{b['version']} sha256={b['sha256']} size={b['size']}"
            + (f" with {len(b['variants'])} more variants" if b.get("variants") else "")
        ),
    )


def _manifest_entries(directory: Path) -> list[dict[str, Any]]:
    """The accepted variants listed in `directory/variants.json`; exits with a clear message if unusable."""
    manifest = directory / "variants.json"
    try:
        entries = json.loads(manifest.read_text())["variants"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        fail(f"{manifest}: not a variants manifest from `edgefleet compress` ({exc})")
    if not isinstance(entries, list) or not entries:
        fail(f"{manifest} lists no accepted variants")
    for entry in entries:
        if not (directory / str(entry.get("file", ""))).is_file():
            fail(f"{manifest}: variant {entry.get('name')!r} names a missing file {entry.get('file')!r}")
    return list(entries)


def _variant_fields(entry: dict[str, Any]) -> dict[str, str]:
    """Form fields of one manifest entry for the registry's variant upload."""
    fields = {
        "variant": str(entry["name"]),
        "format": str(entry["format"]),
        "precision": str(entry.get("precision") or "fp32"),
        "cpu_features": json.dumps(entry.get("cpu_features") or []),
    }
    if entry.get("runtime"):
        fields["runtime"] = str(entry["runtime"])
    for key in ("accuracy", "agreement"):
        if entry.get(key) is not None:
            fields[key] = str(entry[key])
    latency = (entry.get("latency") or {}).get("p50_ms")
    if latency is not None:
        fields["latency_p50_ms"] = str(latency)
    for key in ("inputs", "outputs"):
        if entry.get(key):
            fields[key] = json.dumps(entry[key])
    return fields


@models_app.command("list")
def models_list(url: UrlOpt = None, as_json: JsonOpt = False) -> None:
    """List models and their versions."""
    with api_errors():
        body = connect(url, None).get("/models")
    rows = [
        (m["name"], v["version"], v["format"], v["size"], v["sha256"][:12], v["created_at"])
        for m in body["data"]
        for v in m["versions"]
    ]
    emit(body, as_json, lambda _: table("models", ["name", "version", "format", "size", "sha256", "created"], rows))


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
def deployments_list(url: UrlOpt = None, as_json: JsonOpt = False) -> None:
    """List deployments, newest first."""
    with api_errors():
        body = connect(url, None).get("/deployments")
    rows = [
        (d["id"], f"{d['model_name']}:{d['model_version']}", d["status"], _counts(d["counts"]), d["created_at"])
        for d in body["data"]
    ]
    emit(body, as_json, lambda _: table("deployments", ["id", "model", "status", "targets", "created"], rows))


def _counts(counts: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "-"


@deployments_app.command("show")
def deployments_show(
    deployment_id: Annotated[int, typer.Argument(metavar="ID", help="Deployment id.")],
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one deployment's per-device progress and failure reasons."""
    with api_errors():
        body = connect(url, None).get(f"/deployments/{deployment_id}")
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


@fleet_app.command("summary")
def fleet_summary(url: UrlOpt = None, as_json: JsonOpt = False) -> None:
    """Per device: version, inferences, errors and latency p50/p95 from telemetry."""
    with api_errors():
        body = connect(url, None).get("/fleet/summary")
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
