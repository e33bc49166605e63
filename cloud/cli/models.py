"""`edgefleet models ...`: push model versions (one file, or the variants `edgefleet compress` wrote), list, show and
delete them, set their model cards (which carry the risk class) and aliases (`models alias`)."""

from __future__ import annotations

import zipfile
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group, RenderableType
from rich.text import Text

from cloud.cli._cards import apply_sets, parse_ref, read_card_file
from cloud.cli._common import (
    JsonOpt,
    TokenOpt,
    UrlOpt,
    YesOpt,
    api_errors,
    connect,
    emit,
    fail,
    parse_model_ref,
    table,
)
from cloud.cli._model_views import card_lines, render_model, render_version
from cloud.cli.aliases import alias_app
from cloud.client import (
    REPORT_FILE,
    TRAINABLE_FILE,
    ApiClient,
    ApiError,
    compression_report_field,
    profile_field,
    variant_fields,
)
from cloud.errors import InvalidInputError
from protocol.errors import ManifestError
from protocol.manifest import VariantsManifest, read_manifest
from protocol.profiles import PROFILE_FILE

__all__ = ["REPORT_FILE", "TRAINABLE_FILE", "Risk", "models_app"]

models_app = typer.Typer(
    help="Push, list, show and delete model versions; set their model cards and aliases.", no_args_is_help=True
)
models_app.add_typer(alias_app, name="alias")

# `risk_class` is sent with the upload too, for a registry that takes it at push (older ones ignore the field).
_PRIMARY_FIELDS = frozenset(
    {"format", "inputs", "outputs", "variant", "risk_class", "report", "profile", "output_semantics"}
)


class Risk(StrEnum):
    """A version's risk class: `low` is signed by the coordinator, `high` needs a model card and approvers."""

    LOW = "low"
    HIGH = "high"


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
            "version, with its compression report (report.json); its fp32 model is the primary unless FILE is given.",
        ),
    ] = None,
    risk: Annotated[
        Risk | None,
        typer.Option(
            "--risk",
            help="Risk class: low (signed by the coordinator) or high (needs --card and approvers' signatures). "
            "Default: the card's risk_class, else low.",
        ),
    ] = None,
    card: Annotated[
        Path | None,
        typer.Option(
            "--card",
            exists=True,
            dir_okay=False,
            readable=True,
            help="Model card (JSON: intended_use, training_data, metrics, limitations, owner) stored with the "
            "version after the upload; required with --risk high.",
        ),
    ] = None,
    trainable: Annotated[
        Path | None,
        typer.Option(
            "--trainable",
            exists=True,
            dir_okay=False,
            readable=True,
            help="The version's trainable form (a torch.export .pt2 program), which federated runs train; default "
            f"with --variants: DIR/{TRAINABLE_FILE} when `edgefleet compress` wrote one.",
        ),
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option(
            "--profile",
            exists=True,
            dir_okay=False,
            readable=True,
            help="Reference profile (reference_profile.json from `edgefleet compress` or `edgefleet profile`) that "
            "drift is measured against; default with --variants: DIR/reference_profile.json when present.",
        ),
    ] = None,
    semantics: Annotated[
        str | None,
        typer.Option(
            "--output-semantics",
            help='How the outputs read, as JSON, e.g. \'{"kind": "classifier", "label_output": "label", '
            '"scores_output": "probabilities", "scores": "probabilities"}\' or \'{"kind": "regressor", '
            '"value_output": "variable"}\'. Default: inferred from the graph.',
        ),
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload FILE as NAME:VERSION, or a compressed model's variants (--variants DIR) under one version (with its
    trainable form for federated runs: --trainable, or DIR/trainable.pt2)."""
    if not name or not version:
        fail("--name and --version are required")
    if file is None and variants is None:
        if trainable is None:
            fail(
                "give a model FILE, --variants DIR from `edgefleet compress`, or --trainable FILE.pt2 (alone: for a "
                "version pushed already)"
            )
        if card is not None or risk is not None:
            fail("--card and --risk go with a new version (FILE or --variants), not with --trainable alone")
        _check_trainable_file(trainable)
        with api_errors():
            body = connect(url, token).push_trainable(name, version, trainable)
        emit(body, as_json, _trainable_line)
        return
    card_body = _card_for_push(card, risk)  # checked before a byte is uploaded
    manifest = _manifest(variants) if variants is not None else None
    file, fields = _primary(file, format, variants, manifest)
    if variants is not None:
        fields |= _report_field(variants)
        if trainable is None and (variants / TRAINABLE_FILE).is_file():
            trainable = variants / TRAINABLE_FILE
        if profile is None and (variants / PROFILE_FILE).is_file():
            profile = variants / PROFILE_FILE
    if profile is not None:
        try:
            fields |= profile_field(profile)
        except ValueError as exc:
            fail(str(exc))
    if semantics is not None:
        fields["output_semantics"] = semantics
    if trainable is not None:
        _check_trainable_file(trainable)  # before a byte is uploaded
    fields.update({k: v for k, v in (("inputs", inputs), ("outputs", outputs)) if v is not None})
    if risk is not None:
        fields["risk_class"] = risk.value
    client = connect(url, token)
    with api_errors():
        body = client.push_model(
            file, name=name, version=version, fields={k: v for k, v in fields.items() if k in _PRIMARY_FIELDS}
        )
        if manifest is not None and variants is not None:
            body = _push_other_variants(client, body, variants, manifest, quiet=as_json)
    if trainable is not None:
        body = _push_trainable(client, name, version, trainable)
    if card_body is not None and card is not None:
        stored = _store_pushed_card(client, name, version, card_body, card)
        with api_errors():
            body = client.model_version(name, version) | {"card": stored}
    emit(body, as_json, _pushed_line)


def _check_trainable_file(path: Path) -> None:
    """Exit with the reason unless `path` is a zip archive, as `torch.export.save` writes (the registry checks more)."""
    if not zipfile.is_zipfile(path):
        fail(f"--trainable {path}: not a torch.export program (.pt2 zip archive); export it with torch.export.save")


def _push_trainable(client: ApiClient, name: str, version: str, path: Path) -> dict[str, Any]:
    """PUT the trainable form of a version just pushed; if that fails, say what state the version is left in."""
    try:
        return client.push_trainable(name, version, path)
    except ApiError as exc:
        fail(
            f"pushed {name}:{version}, but its trainable form was not stored: {exc}. Until it is, federated runs "
            f"cannot start from it; store it with `edgefleet models push --name {name} --version {version} "
            f"--trainable FILE.pt2`"
        )


def _trainable_line(body: dict[str, Any]) -> str:
    """'stored the trainable form of digits:2.0: torch.export, sha256=..., size=...'."""
    form = body["trainable"]
    return (
        f"stored the trainable form of {body['name']}:{body['version']}: {form['format']}, sha256={form['sha256']}, "
        f"size={form['size']}"
    )


def _pushed_line(body: dict[str, Any]) -> str:
    """'pushed digits:2.0 sha256=... size=...' (+ variants; + trainable form; + risk, signing state and card when a
    card was set)."""
    line = f"pushed {body['name']}:{body['version']} sha256={body['sha256']} size={body['size']}"
    if body.get("variants"):
        line += f" with {len(body['variants'])} more variants"
    if body.get("trainable"):
        line += f"; trainable form {body['trainable']['size']} B"
    if body.get("card"):
        line += f"; {body['risk_class']} risk, {body['signing_state']}, card sha256={body['card']['sha256']}"
    return line


def _card_for_push(path: Path | None, risk: Risk | None) -> dict[str, Any] | None:
    """The card to store after the upload, validated against the registry's schema first; None without --card.

    A high-risk push without a card is refused here: the version would exist without what approvers must see.
    """
    if path is None:
        if risk is Risk.HIGH:
            fail(
                "a high-risk version needs its model card: pass --card FILE (JSON with intended_use, training_data, "
                "metrics, limitations, owner); approvers sign the version together with its card"
            )
        return None
    try:
        body = read_card_file(path)
    except ValueError as exc:
        fail(str(exc))
    declared = body.get("risk_class")
    if risk is not None and declared is not None and declared != risk.value:
        fail(f"--risk {risk.value}, but {path} says risk_class {declared!r}: make them agree")
    if risk is not None:
        body["risk_class"] = risk.value
    from cloud.services.cards import parse_card  # the registry's own schema; only a push with a card needs it

    try:
        parse_card({"risk_class": Risk.LOW.value, **body})  # a new version is low risk unless the card says more
    except InvalidInputError as exc:
        fail(f"{path}: {exc}")
    return body


def _store_pushed_card(client: ApiClient, name: str, version: str, card: dict[str, Any], path: Path) -> dict[str, Any]:
    """PUT the card of a version just pushed; if that fails, say what state the version is left in."""
    try:
        return client.set_model_card(name, version, card)
    except ApiError as exc:
        fail(
            f"pushed {name}:{version}, but its card was not stored: {exc}. Until it is, the version has no card and "
            f"its risk class is the registry's default; store it with "
            f"`edgefleet models card {name}:{version} --file {path}`"
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


def _report_field(directory: Path) -> dict[str, str]:
    """The compression report in `directory` as the push's `report` field (none when the directory has none)."""
    try:
        return compression_report_field(directory)
    except ValueError as exc:
        fail(str(exc))


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


@models_app.command("card")
def models_card(
    ref: Annotated[str, typer.Argument(metavar="NAME:VERSION", help="Model version, e.g. digits:2.0.")],
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", exists=True, dir_okay=False, readable=True, help="The card as a JSON file."),
    ] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="key=value merged into the current card (or into --file); repeatable. Dotted keys reach into "
            "objects; metrics are numbers: --set metrics.accuracy=0.97",
        ),
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Set the model card of NAME:VERSION (--file, --set), or show it (neither). The card carries the risk class."""
    try:
        name, version = parse_ref(ref)
        base = read_card_file(file) if file is not None else None
    except ValueError as exc:
        fail(str(exc))
    client = connect(url, token)
    with api_errors():
        if base is None and not sets:
            body = client.model_card(name, version)
        else:
            current = base if base is not None else _current_card(client, name, version)
            try:
                card = apply_sets(current, sets or [])
            except ValueError as exc:
                fail(str(exc))
            body = client.set_model_card(name, version, card)
    emit(body, as_json, _render_card)


def _current_card(client: ApiClient, name: str, version: str) -> dict[str, Any]:
    """The version's card as stored, or an empty one (a version without a card yet)."""
    try:
        return dict(client.model_card(name, version)["card"])
    except ApiError as exc:
        if exc.status == 404 and "no model card" in str(exc):
            return {}
        raise


def _render_card(body: dict[str, Any]) -> RenderableType:
    head = (
        f"card of {body['name']}:{body['version']} ({body['risk_class']} risk, {body['signing_state']}) "
        f"sha256={body['sha256']}, by {body['updated_by']} at {body['updated_at']}"
    )
    return Group(Text(head), *card_lines(body["card"]))


@models_app.command("show")
def models_show(
    ref: Annotated[
        str,
        typer.Argument(
            metavar="NAME[:VERSION]",
            help="A model (its versions and aliases), or one version: digits:2.0, or the one digits@production names.",
        ),
    ],
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a model's versions and aliases, or one version: variants with their compression report, lineage
    (parent version, run, who pushed it), aliases, risk class, signing state, model card and approvals."""
    try:
        model = parse_model_ref(ref, bare=True)
    except ValueError as exc:
        fail(str(exc))
    client = connect(url, token)
    with api_errors():
        if model.version is None and model.alias is None:
            emit(client.model(model.name) | {"aliases": client.aliases(model.name)}, as_json, render_model)
            return
        version = model.version or _alias_target(client, model.name, str(model.alias))
        emit(_version_detail(client, model.name, version), as_json, render_version)


def _alias_target(client: ApiClient, name: str, alias: str) -> str:
    """The version `name@alias` points at; exits with the reason when there is no such alias."""
    found = next((a for a in client.aliases(name) if a["alias"] == alias), None)
    if found is None:
        fail(f"model {name!r} has no alias {alias!r} (`edgefleet models alias list {name}`)")
    return str(found["version"])


def _version_detail(client: ApiClient, name: str, version: str) -> dict[str, Any]:
    """A version with its card (None without one), approval status and the aliases that point at it."""
    body = client.model_version(name, version)
    try:
        card: dict[str, Any] | None = client.model_card(name, version)
    except ApiError as exc:
        if exc.status != 404:
            raise
        card = None
    aliases = sorted(a["alias"] for a in client.aliases(name) if a["version"] == version)
    return body | {"card": card, "approvals": client.version_approvals(name, version), "aliases": aliases}


@models_app.command("delete")
def models_delete(
    ref: Annotated[str, typer.Argument(metavar="NAME:VERSION", help="The version to delete, e.g. digits:1.0.")],
    yes: YesOpt = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete a version nothing uses any more, and its artifacts no other version shares.

    Refused (with what holds it) while a device runs it, a device's desired state or an unfinished rollout
    names it, or an alias points to it.
    """
    try:
        name, version = parse_ref(ref)
    except ValueError as exc:
        fail(str(exc))
    client = connect(url, token)
    if not yes:
        typer.confirm(f"delete {name}:{version} and its artifacts no other version shares?", abort=True)
    with api_errors():
        body = client.delete_model_version(name, version)
    emit(body, as_json, _deleted_line)


def _deleted_line(body: dict[str, Any]) -> str:
    removed, kept = len(body["removed_artifacts"]), len(body["kept_artifacts"])
    line = f"deleted {body['name']}:{body['version']}; {removed} artifact(s) removed"
    return line + (f", {kept} kept (other versions share them)" if kept else "")
