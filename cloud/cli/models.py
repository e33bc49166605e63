"""`edgefleet models ...`: push model versions (one file, or the variants `edgefleet compress` wrote) and list them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cloud.cli._common import JsonOpt, TokenOpt, UrlOpt, api_errors, connect, emit, fail, table
from cloud.client import ApiClient
from protocol.errors import ManifestError
from protocol.manifest import ManifestVariant, VariantsManifest, read_manifest

__all__ = ["models_app"]

models_app = typer.Typer(help="Push and list model versions in the registry.", no_args_is_help=True)

_PRIMARY_FIELDS = frozenset({"format", "inputs", "outputs", "variant"})


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
    manifest = _manifest(variants) if variants is not None else None
    file, fields = _primary(file, format, variants, manifest)
    fields.update({k: v for k, v in (("inputs", inputs), ("outputs", outputs)) if v is not None})
    client = connect(url, token)
    with api_errors():
        body = client.push_model(
            file, name=name, version=version, fields={k: v for k, v in fields.items() if k in _PRIMARY_FIELDS}
        )
        if manifest is not None and variants is not None:
            body = _push_other_variants(client, body, variants, manifest, quiet=as_json)
    emit(
        body,
        as_json,
        lambda b: (
            f"pushed {b['name']}:{b['version']} sha256={b['sha256']} size={b['size']}"
            + (f" with {len(b['variants'])} more variants" if b.get("variants") else "")
        ),
    )


def _manifest(directory: Path) -> VariantsManifest:
    """The manifest in `directory`; exits with the reason if it is unusable."""
    try:
        return read_manifest(directory)
    except ManifestError as exc:
        fail(str(exc))


def _primary(
    file: Path | None, format: str, variants: Path | None, manifest: VariantsManifest | None
) -> tuple[Path, dict[str, str]]:
    """The file pushed as the version itself, and its form fields: FILE, else the manifest's primary variant."""
    if file is not None:
        return file, {"format": format}
    assert variants is not None and manifest is not None
    return variants / manifest.primary.file, variant_fields(manifest.primary)


def _push_other_variants(
    client: ApiClient, body: dict[str, Any], directory: Path, manifest: VariantsManifest, *, quiet: bool
) -> dict[str, Any]:
    """Add every manifest variant but the one pushed as the version; returns the version as it then stands."""
    for entry in manifest.variants:
        if entry.sha256 == body["sha256"]:
            continue  # the primary itself
        body = client.add_variant(
            directory / entry.file, name=body["name"], version=body["version"], fields=variant_fields(entry)
        )
        if not quiet:
            typer.echo(f"  + variant {entry.name} ({entry.format.value}, {entry.precision}, {entry.size} B)")
    return body


def variant_fields(entry: ManifestVariant) -> dict[str, str]:
    """Form fields of one manifest entry for the registry's variant upload."""
    fields = {
        "variant": entry.name,
        "format": entry.format.value,
        "precision": entry.precision or "fp32",
        "cpu_features": json.dumps(entry.cpu_features),
    }
    if entry.runtime:
        fields["runtime"] = entry.runtime
    for key, value in (
        ("accuracy", entry.accuracy),
        ("agreement", entry.agreement),
        ("latency_p50_ms", entry.latency.p50_ms),
    ):
        if value is not None:
            fields[key] = str(value)
    for key, specs in (("inputs", entry.inputs), ("outputs", entry.outputs)):
        if specs:
            fields[key] = json.dumps([spec.model_dump(mode="json") for spec in specs])
    return fields


@models_app.command("list")
def models_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List models and their versions."""
    with api_errors():
        body = connect(url, token).get("/models")
    rows = [
        (m["name"], v["version"], v["format"], v["size"], v["sha256"][:12], v["created_at"])
        for m in body["data"]
        for v in m["versions"]
    ]
    emit(body, as_json, lambda _: table("models", ["name", "version", "format", "size", "sha256", "created"], rows))
