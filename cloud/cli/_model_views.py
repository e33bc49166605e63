"""How `edgefleet models show` prints a model and a version: versions, aliases, variants with their compression
report, trainable form, lineage, card and approvals. Pure: JSON bodies in, rich renderables out."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text

from cloud.cli._common import table

__all__ = ["approval_line", "card_lines", "render_model", "render_version", "trainable_line", "variant_rows"]

_VARIANT_COLUMNS = (
    "variant", "format", "precision", "runtime", "size", "accuracy", "agreement", "p50 ms", "drop pp", "gate"
)  # fmt: skip


def render_model(body: dict[str, Any]) -> RenderableType:
    """A model: its versions (lineage, who pushed them, aliases) and its aliases."""
    by_version: dict[str, list[str]] = {}
    for alias in body.get("aliases", []):
        by_version.setdefault(alias["version"], []).append(alias["alias"])
    rows = [
        (
            v["version"],
            v["format"],
            v["size"],
            1 + len(v.get("variants", [])),
            v.get("risk_class"),
            v.get("signing_state"),
            ", ".join(by_version.get(v["version"], [])) or None,
            (v.get("lineage") or {}).get("parent_version"),
            (v.get("lineage") or {}).get("run"),
            "yes" if v.get("trainable") else None,
            v.get("created_by"),
            v["created_at"],
        )
        for v in body["versions"]
    ]
    columns = [
        "version", "format", "size", "variants", "risk", "signing", "aliases", "parent", "run", "trainable", "by",
        "created",
    ]  # fmt: skip
    parts: list[RenderableType] = [Text(f"{body['name']}  created {body['created_at']}")]
    parts.append(table("versions", columns, rows) if rows else Text("versions: none"))
    aliases = [(a["alias"], a["version"], a["updated_by"], a["updated_at"]) for a in body.get("aliases", [])]
    parts.append(table("aliases", ["alias", "version", "set by", "at"], aliases) if aliases else Text("aliases: none"))
    return Group(*parts)


def variant_rows(body: dict[str, Any]) -> list[tuple[Any, ...]]:
    """One row per variant (the primary first), with what its compression report says about it."""
    report = {row.get("name"): row for row in (body.get("compression_report") or {}).get("models", [])}
    primary = {
        "name": body.get("primary_variant", "default"),
        "format": body["format"],
        "precision": "fp32",
        "size": body["size"],
    }
    rows = []
    for index, variant in enumerate([primary, *body.get("variants", [])]):
        measured = report.get(variant["name"], {})
        rows.append(
            (
                variant["name"] + (" (primary)" if index == 0 else ""),
                variant["format"],
                variant.get("precision"),
                variant.get("runtime"),
                variant["size"],
                _figure(_either(variant, measured, "accuracy"), "{:.2%}"),
                _figure(_either(variant, measured, "agreement"), "{:.2%}"),
                _figure(_either(variant, measured, "latency_p50_ms"), "{:.4f}"),
                _figure(measured.get("accuracy_drop_pp"), "{:+.2f}"),
                measured.get("gate"),
            )
        )
    return rows


def _either(variant: dict[str, Any], measured: dict[str, Any], key: str) -> Any:
    """The figure registered with the variant, else the report's."""
    value = variant.get(key)
    return value if value is not None else measured.get(key)


def _figure(value: Any, style: str) -> str | None:
    return None if value is None else style.format(value)


def render_version(body: dict[str, Any]) -> RenderableType:
    """A version: digest, lineage, aliases, variants with their report, trainable form, card and approvals."""
    head = (
        f"{body['name']}:{body['version']}  {body['format']}  {body['size']} B  sha256={body['sha256']}  "
        f"created {body['created_at']}" + (f" by {body['created_by']}" if body.get("created_by") else "")
    )
    lineage = body.get("lineage") or {}
    card = body.get("card")
    parts: list[RenderableType] = [
        Text(head),
        Text(f"risk: {body.get('risk_class', 'low')}  signing: {body.get('signing_state', '-')}"),
        Text(f"lineage: parent version {lineage.get('parent_version') or '-'}, run {lineage.get('run') or '-'}"),
        Text("aliases: " + (", ".join(f"{body['name']}@{a}" for a in body.get("aliases", [])) or "none")),
        table("variants", _VARIANT_COLUMNS, variant_rows(body)),
    ]
    parts.append(Text(trainable_line(body.get("trainable"))))
    report = body.get("compression_report")
    if report:
        refused = ", ".join(report.get("refused") or []) or "none"
        parts.append(Text(f"compression report: max drop {report.get('max_drop_pp')} pp; refused: {refused}"))
    if card is None:
        parts.append(Text("card: none"))
    else:
        parts += [Text(f"card: sha256={card['sha256']}, by {card['updated_by']} at {card['updated_at']}")]
        parts += card_lines(card["card"])
    if body.get("approvals") is not None:
        parts.append(Text(approval_line(body["approvals"])))
    return Group(*parts)


def trainable_line(form: dict[str, Any] | None) -> str:
    """'trainable: torch.export, 123456 B, sha256=...' or why federated runs cannot start from the version."""
    if not form:
        return "trainable: none (federated runs need one: `edgefleet models push --trainable FILE.pt2`)"
    return f"trainable: {form.get('format')}, {form.get('size')} B, sha256={form.get('sha256')}"


def card_lines(card: dict[str, Any]) -> list[Text]:
    """One plain line per card field (user text is never read as console markup)."""
    lines = []
    for key, value in sorted(card.items()):
        if key == "extra" and not value:
            continue
        shown = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        lines.append(Text(f"  {key}: {shown}"))
    return lines


def approval_line(status: dict[str, Any]) -> str:
    """'approvals: 1 of 2 (alice); missing: bob, carol' and whether the version may be deployed."""
    line = ""
    if status.get("required"):
        signed = status.get("signed_by") or []
        line = f"approvals: {len(signed)} of {status['required']}" + (f" ({', '.join(signed)})" if signed else "")
        if status.get("missing"):
            line += f"; not yet: {', '.join(status['missing'])}"
        line += "\n"
    return line + ("deployable: yes" if status.get("deployable") else f"not deployable: {status.get('reason')}")
