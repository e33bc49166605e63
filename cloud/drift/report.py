"""The drift report as one self-contained HTML page: a table per cohort and inline SVG charts, no scripts, no
external resources (it opens from a file, an e-mail or the API alike). Pure: the API's drift dict in, text out."""

from __future__ import annotations

from html import escape
from typing import Any

__all__ = ["render_html"]

_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#1b1b1b;max-width:72rem}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}td,th{border:1px solid #bbb;padding:.25rem .6rem;text-align:right}
th{background:#eee}td.l,th.l{text-align:left}.drift{font-weight:bold}.ok{color:#225}
svg text{font-size:10px;font-family:system-ui,sans-serif}
"""


def _num(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.1f} %"


def _ks_chart(cohort: dict[str, Any]) -> str:
    """Bars of each feature's KS against its threshold line; a drifted feature is hatched as well as dark, so the
    chart reads without colour."""
    features = cohort["features"]
    if not features:
        return ""
    width, height, bar = max(200, 22 * len(features) + 40), 140, 16
    scale = height - 30
    parts = [
        f'<svg role="img" aria-label="KS per feature, cohort {escape(cohort["cohort"])}" width="{width}" '
        f'height="{height}" xmlns="http://www.w3.org/2000/svg">',
        '<defs><pattern id="h" width="4" height="4" patternUnits="userSpaceOnUse">'
        '<path d="M0 4L4 0" stroke="#fff" stroke-width="1"/></pattern></defs>',
    ]
    for i, f in enumerate(features):
        x = 30 + 22 * i
        h = max(1.0, min(1.0, f["ks"]) * scale)
        y = height - 20 - h
        fill = "#a11" if f["drifted"] else "#68a"
        parts.append(f'<rect x="{x}" y="{y:.1f}" width="{bar}" height="{h:.1f}" fill="{fill}"/>')
        if f["drifted"]:
            parts.append(f'<rect x="{x}" y="{y:.1f}" width="{bar}" height="{h:.1f}" fill="url(#h)"/>')
        limit = height - 20 - min(1.0, f["critical"]) * scale
        parts.append(f'<line x1="{x - 2}" x2="{x + bar + 2}" y1="{limit:.1f}" y2="{limit:.1f}" stroke="#000"/>')
        parts.append(f'<text x="{x + 3}" y="{height - 6}">{f["index"]}</text>')
    parts.append(
        f'<text x="0" y="12">KS (line: threshold)</text><text x="{width - 60}" y="{height - 6}">feature</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _cohort_rows(cohort: dict[str, Any]) -> str:
    state = "DRIFTED" if cohort["drifted"] else ("too few rows" if cohort["insufficient"] else "no drift")
    cls = "drift" if cohort["drifted"] else "ok"
    cells = [
        f'<td class="l">{escape(cohort["cohort"])}</td>',
        f'<td class="l {cls}">{state}</td>',
        f"<td>{len(cohort['devices'])}</td>",
        f"<td>{cohort['rows']}</td>",
        f"<td>{_num(cohort['max_ks'])}</td>",
        f"<td>{_num(cohort['class_psi'])}</td>",
        f"<td>{_num(cohort['confidence_median'])} / {_num(cohort['reference_confidence_median'])}</td>",
        f"<td>{_pct(cohort['estimated_accuracy'])} / {_pct(cohort['reference_accuracy'])}</td>",
        f"<td>{_pct(cohort.get('labelled_accuracy'))} (n={cohort.get('labelled', 0)})</td>",
    ]
    return f"<tr>{''.join(cells)}</tr>"


def render_html(drift: dict[str, Any]) -> str:
    """The page for one drift report (`cloud.drift.service.drift_public`)."""
    title = f"Drift of {drift['model']}:{drift['version']}"
    ref = drift["reference"]
    head = (
        "<tr><th class=l>cohort</th><th class=l>state</th><th>devices</th><th>rows</th><th>max KS</th>"
        "<th>class PSI</th><th>confidence median (now / ref)</th><th>est. accuracy (now / ref)</th>"
        "<th>labelled accuracy (labels)</th></tr>"
    )
    sections = []
    for cohort in drift["cohorts"]:
        reasons = "".join(f"<li>{escape(r)}</li>" for r in cohort["reasons"]) or "<li>none</li>"
        sections.append(f"<h2>{escape(cohort['cohort'])}</h2><p>Reasons:</p><ul>{reasons}</ul>{_ks_chart(cohort)}")
    by = escape(drift["by"] or "the whole fleet")
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{escape(title)}</h1>"
        f"<p>Cohorts by {by}; windows of the last {drift['window_s']} s. Reference: {ref['rows']} rows "
        f"({escape(ref['source'] or 'unnamed data')}), accuracy {_pct(ref['accuracy'])}, {ref['features']} "
        f"{escape(ref['feature_mode'])} features.</p>"
        f"<table>{head}{''.join(_cohort_rows(c) for c in drift['cohorts'])}</table>{''.join(sections)}</body></html>"
    )
