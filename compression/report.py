"""The compression report: one JSON document, rendered as Markdown and as an HTML page with inline SVG charts.

`build_document` turns measurements and gate verdicts into plain data; the renderers only format it.
"""

from __future__ import annotations

import html
import platform
from dataclasses import asdict
from typing import Any

from compression.evaluate import CompressionReport, GateVerdict

__all__ = ["build_document", "render_html", "render_markdown"]


def build_document(
    report: CompressionReport,
    verdicts: list[GateVerdict],
    *,
    max_drop_pp: float,
    files: dict[str, str] | None = None,
    skipped: dict[str, str] | None = None,
    evaluated: dict[str, str] | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """The report as JSON-ready data: one row per model (fp32 first) with ratios to fp32 and the gate verdict;
    `skipped` maps the variants not produced to why, `evaluated` says which output was judged as what task."""
    base = report.baseline
    by_name = {v.name: v for v in verdicts}
    rows = []
    for m in (base, *report.variants):
        verdict = by_name.get(m.name)
        rows.append(
            {
                **asdict(m),
                "file": (files or {}).get(m.name),
                "size_ratio": m.size_bytes / base.size_bytes,
                "latency_p50_ratio": m.latency_p50_ms / base.latency_p50_ms if base.latency_p50_ms else None,
                "accuracy_drop_pp": verdict.drop_pp if verdict else 0.0,  # the gated quantity (see "metric")
                "metric": verdict.metric if verdict else None,
                "accepted": verdict.accepted if verdict else True,
                "gate": verdict.reason if verdict else "baseline",
            }
        )
    return {
        "format_version": 1,
        "cpu": {"model": report.cpu_model, "machine": platform.machine(), "isa_flags": list(report.isa_flags)},
        "max_drop_pp": max_drop_pp,
        "evaluated": evaluated or {"output": None, "task": "classification", "read_as": "scores"},
        "models": rows,
        "refused": [v.name for v in verdicts if not v.accepted],
        "skipped": [{"name": name, "reason": reason} for name, reason in (skipped or {}).items()],
        "notes": list(notes or []),
    }


_QUALITY = {
    "classification": (("accuracy", "accuracy", "{:.2%}"), ("agreement", "agrees with fp32", "{:.2%}")),
    "regression": (
        ("mae", "MAE", "{:.4g}"),
        ("rmse", "RMSE", "{:.4g}"),
        ("deviation_pct", "deviation from fp32 (% of spread)", "{:.3f}"),
    ),
}
_COLUMNS = (
    ("name", "model", "{}"),
    ("size_bytes", "size (B)", "{:,}"),
    ("size_ratio", "size x fp32", "{:.2f}"),
    ("quality", "", ""),  # the task's columns (`_QUALITY`)
    ("latency_p50_ms", "p50 (ms)", "{:.4f}"),
    ("latency_p99_ms", "p99 (ms)", "{:.4f}"),
    ("latency_p50_ratio", "p50 x fp32", "{:.2f}"),
    ("peak_rss_bytes", "peak RSS (MiB)", "mib"),
    ("model_rss_bytes", "model RSS (MiB)", "mib"),
    ("gate", "gate", "{}"),
)


def _columns(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The table's columns, with the quality columns of the run's task."""
    quality = _QUALITY[doc["evaluated"]["task"]]
    return [c for column in _COLUMNS for c in (quality if column[0] == "quality" else (column,))]


def _gate_sentence(doc: dict[str, Any]) -> str:
    metrics = {row["metric"] for row in doc["models"] if row.get("metric")}
    limit = f"{doc['max_drop_pp']:g}"
    if "rmse" in metrics:
        return f"Gate: RMSE at most {limit} % above fp32's."
    if doc["evaluated"]["task"] == "regression":
        return f"Gate: outputs at most {limit} % of their spread (RMSE / standard deviation) away from fp32's."
    if "agreement" in metrics:
        return f"Gate: at most {limit} % of the samples classed unlike fp32 (the data has no labels)."
    return f"Gate: at most {limit} percentage points of accuracy below fp32."


def _evaluated_sentence(doc: dict[str, Any]) -> str:
    evaluated = doc["evaluated"]
    if not evaluated.get("output"):
        return "Evaluated: the first output, as class scores."
    return f"Evaluated: output `{evaluated['output']}` as {evaluated['task']} ({evaluated['read_as']})."


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if fmt == "mib":
        return f"{value / 2**20:.1f}"
    if key == "gate" and not row["accepted"]:
        return f"REFUSED: {value}"
    return fmt.format(value)


def render_markdown(doc: dict[str, Any]) -> str:
    """A readable Markdown page: the CPU, then one table row per model, then what was refused or skipped."""
    columns = _columns(doc)
    lines = [
        "# Compression report",
        "",
        f"CPU: {doc['cpu']['model']} ({doc['cpu']['machine']}); ISA flags: {', '.join(doc['cpu']['isa_flags']) or '-'}",
        "",
        _evaluated_sentence(doc) + " " + _gate_sentence(doc),
        "",
        "| " + " | ".join(title for _, title, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in doc["models"]:
        lines.append("| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in columns) + " |")
    lines += [
        "",
        "Latency: one sample per call, single-threaded, after warm-up. Peak RSS: a fresh process that loads "
        "the model and runs it (`VmHWM`); model RSS: that peak minus the same process before loading.",
    ]
    if doc["refused"]:
        lines += ["", f"**Refused:** {', '.join(doc['refused'])}"]
    if doc["skipped"]:
        lines += ["", "**Skipped** (not produced):", ""]
        lines += [f"- {entry['name']}: {entry['reason']}" for entry in doc["skipped"]]
    lines += [line for note in doc["notes"] for line in ("", f"Note: {note}.")]
    return "\n".join(lines) + "\n"


def _bar_chart(rows: list[dict[str, Any]], key: str, title: str, unit: str) -> str:
    width, bar_h, left = 520, 22, 120
    values = [float(r[key] or 0.0) for r in rows]
    top = max(values) or 1.0
    height = 30 + bar_h * len(rows) + 10
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}">',
        f'<text x="4" y="18" font-size="14" font-weight="bold">{html.escape(title)}</text>',
    ]
    for i, (row, value) in enumerate(zip(rows, values, strict=True)):
        y = 30 + i * bar_h
        length = (width - left - 90) * value / top
        colour = "#999" if row["name"] == "fp32" else ("#2a7" if row["accepted"] else "#c33")
        parts += [
            f'<text x="4" y="{y + 15}" font-size="12">{html.escape(row["name"])}</text>',
            f'<rect x="{left}" y="{y + 3}" width="{length:.1f}" height="{bar_h - 6}" fill="{colour}"/>',
            f'<text x="{left + length + 4:.1f}" y="{y + 15}" font-size="12">{value:.3g} {unit}</text>',
        ]
    parts.append("</svg>")
    return "".join(parts)


def render_html(doc: dict[str, Any]) -> str:
    """A self-contained HTML page: the table and bar charts of size, quality and p50 latency."""
    rows = doc["models"]
    columns = _columns(doc)
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in columns)
    body = "".join(
        f'<tr class="{"ok" if row["accepted"] else "refused"}">'
        + "".join(f"<td>{html.escape(_cell(row, key, fmt))}</td>" for key, _, fmt in columns)
        + "</tr>"
        for row in rows
    )
    regression = doc["evaluated"]["task"] == "regression"
    labelled = any(row["accuracy"] is not None for row in rows)
    quality = (
        ("deviation_pct", "Deviation from fp32 (% of spread)", "%")
        if regression
        else ("accuracy", "Accuracy on the eval set", "")
        if labelled
        else ("agreement", "Agreement with fp32", "")
    )
    charts = "".join(
        f"<figure>{_bar_chart(rows, key, title, unit)}</figure>"
        for key, title, unit in (
            ("size_ratio", "Size relative to fp32", "x"),
            quality,
            ("latency_p50_ratio", "p50 latency relative to fp32", "x"),
        )
    )
    skipped = "".join(
        f"<li>{html.escape(entry['name'])}: {html.escape(entry['reason'])}</li>" for entry in doc["skipped"]
    )
    cpu = doc["cpu"]
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Compression report</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}tr.refused{background:#fdd}"
        "figure{display:inline-block;margin:1em}</style></head><body>"
        "<h1>Compression report</h1>"
        f"<p>CPU: {html.escape(cpu['model'])} ({html.escape(cpu['machine'])}); ISA flags: "
        f"<code>{html.escape(', '.join(cpu['isa_flags']) or '-')}</code></p>"
        f"<p>{html.escape(_evaluated_sentence(doc))} {html.escape(_gate_sentence(doc))}"
        + (f" <strong>Refused: {html.escape(', '.join(doc['refused']))}</strong>" if doc["refused"] else "")
        + f"</p><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        + (f"<h2>Skipped (not produced)</h2><ul>{skipped}</ul>" if skipped else "")
        + "".join(f"<p>Note: {html.escape(note)}.</p>" for note in doc["notes"])
        + f"{charts}</body></html>\n"
    )
