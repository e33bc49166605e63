"""The drift report as one PNG image: the HTML page's content (`cloud.drift.report`) drawn with matplotlib's Agg
backend, for a chat message, a ticket or a slide. Pure: the API's drift dict in, PNG bytes out.

One row per cohort, four panels: each feature's KS against its threshold (a drifted feature dark red and hatched,
so the chart reads without colour), the predicted-class distribution against the reference's, the top-1
confidence median against the reference's, and accuracy (estimated from confidence, and labelled when labels were
fed back) against the reference's. matplotlib is imported here, inside `render_png`, so a coordinator that never
draws a PNG never loads it. Keys of the drift dict that an older or newer coordinator lacks are drawn as "-".
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["MAX_COHORTS", "render_png"]

MAX_COHORTS = 24  # rows drawn; a report with more says how many were left out (the JSON and HTML have them all)
_MAX_CLASSES = 20  # classes drawn per cohort: the most frequent of the cohort and the reference
_DPI = 100
_ROW_INCHES = 2.6
_WIDTH_INCHES = 16.0
_DRIFT, _CLEAN, _REF = "#a11", "#68a", "#bbb"


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _shares(counts: Mapping[str, Any] | None) -> dict[str, float]:
    """Class counts as shares of their total (empty when there are none)."""
    clean = {str(k): float(v) for k, v in (counts or {}).items() if _float(v) is not None and float(v) >= 0}
    total = sum(clean.values())
    return {k: v / total for k, v in clean.items()} if total > 0 else {}


def _class_order(now: Mapping[str, float], ref: Mapping[str, float]) -> list[str]:
    """The classes to draw: the most frequent in either distribution, in a stable order (numeric ids by value)."""
    top = sorted(set(now) | set(ref), key=lambda k: -max(now.get(k, 0.0), ref.get(k, 0.0)))[:_MAX_CLASSES]
    return sorted(top, key=lambda k: (0, int(k), k) if k.lstrip("-").isdigit() else (1, 0, k))


def _state(cohort: Mapping[str, Any]) -> str:
    if cohort.get("drifted"):
        return "DRIFTED"
    return "too few rows" if cohort.get("insufficient") else "no drift"


def _ks_panel(ax: Axes, cohort: Mapping[str, Any]) -> None:
    features: Sequence[Mapping[str, Any]] = cohort.get("features") or []
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("KS (line: threshold)", fontsize=8)
    if not features:
        ax.text(0.5, 0.5, "no features sketched", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        return
    xs = list(range(len(features)))
    for x, f in zip(xs, features, strict=True):
        drifted = bool(f.get("drifted"))
        ks = min(1.0, _float(f.get("ks")) or 0.0)
        ax.bar(x, ks, width=0.8, color=_DRIFT if drifted else _CLEAN, hatch="//" if drifted else None,
               edgecolor="white" if drifted else None)  # fmt: skip
        critical = _float(f.get("critical"))
        if critical is not None:
            ax.hlines(min(1.0, critical), x - 0.45, x + 0.45, colors="black", linewidth=1.5)
    ax.set_xticks(xs, [str(f.get("index", i)) for i, f in zip(xs, features, strict=True)], fontsize=7)
    ax.set_xlabel("feature", fontsize=8)


def _class_panel(ax: Axes, cohort: Mapping[str, Any], reference: Mapping[str, Any]) -> None:
    now, ref = _shares(cohort.get("class_counts")), _shares(reference.get("class_counts"))
    psi = _float(cohort.get("class_psi"))
    ax.set_title(f"predicted classes (PSI {'-' if psi is None else f'{psi:.3f}'})", fontsize=9, loc="left")
    classes = _class_order(now, ref)
    if not classes:
        ax.text(0.5, 0.5, "no class counts", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        return
    xs = range(len(classes))
    colour = _DRIFT if psi is not None and cohort.get("drifted") and psi > 0.25 else _CLEAN
    ax.bar([x - 0.2 for x in xs], [ref.get(c, 0.0) for c in classes], width=0.4, color=_REF, label="reference")
    ax.bar([x + 0.2 for x in xs], [now.get(c, 0.0) for c in classes], width=0.4, color=colour, label="now")
    ax.set_xticks(list(xs), classes, fontsize=7)
    ax.set_ylabel("share")
    ax.legend(fontsize=7, loc="upper right")


def _pair_panel(ax: Axes, title: str, pairs: Sequence[tuple[str, Any, Any]], *, percent: bool) -> None:
    """Bars of (label, now, reference) pairs on a 0..1 scale, each value written above its bar ("-" when missing)."""
    ax.set_title(title, fontsize=9, loc="left")
    ax.set_ylim(0, 1.15)
    xs = range(len(pairs))
    for x, (_, now, ref) in zip(xs, pairs, strict=True):
        for dx, value, colour in ((-0.2, _float(ref), _REF), (0.2, _float(now), _CLEAN)):
            height = 0.0 if value is None else max(0.0, min(1.0, value))
            ax.bar(x + dx, height, width=0.4, color=colour)
            text = "-" if value is None else (f"{100 * value:.1f}%" if percent else f"{value:.3f}")
            ax.text(x + dx, height + 0.02, text, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [label for label, _, _ in pairs], fontsize=8)
    ax.set_xlabel("grey: reference, blue: now", fontsize=7)


def _labelled(cohort: Mapping[str, Any]) -> Any:
    """The cohort's labelled accuracy, under whichever key the coordinator's version names it (None: no labels)."""
    for key in ("labelled_accuracy", "labeled_accuracy", "label_accuracy"):
        if key in cohort:
            return cohort[key]
    return None


def render_png(drift: Mapping[str, Any]) -> bytes:
    """The PNG of one drift report (`cloud.drift.service.drift_public`)."""
    # Imported here: the coordinator pays for matplotlib only when a PNG is asked for. The Figure API (no pyplot)
    # keeps no global state, so concurrent requests draw independently on the Agg canvas.
    from matplotlib.figure import Figure

    cohorts: Sequence[Mapping[str, Any]] = drift.get("cohorts") or []
    reference: Mapping[str, Any] = drift.get("reference") or {}
    shown = list(cohorts[:MAX_COHORTS])
    rows = max(1, len(shown))
    fig = Figure(figsize=(_WIDTH_INCHES, 0.8 + _ROW_INCHES * rows), dpi=_DPI)
    ref_acc = _float(reference.get("accuracy"))
    by = drift.get("by") or "the whole fleet"
    fig.suptitle(
        f"Drift of {drift.get('model', '?')}:{drift.get('version', '?')} — cohorts by {by}, windows of the last "
        f"{drift.get('window_s', '?')} s\nreference: {reference.get('rows', '?')} rows "
        f"({reference.get('source') or 'unnamed data'}), labelled accuracy "
        f"{'-' if ref_acc is None else f'{100 * ref_acc:.1f}%'}, {reference.get('features', '?')} "
        f"{reference.get('feature_mode', '')} features"
        + (f"; {len(cohorts) - len(shown)} more cohorts in the JSON/HTML report" if len(cohorts) > len(shown) else ""),
        fontsize=11,
        x=0.01,
        ha="left",
    )
    axes = fig.subplots(rows, 4, squeeze=False, gridspec_kw={"width_ratios": [3, 3, 1.4, 2.2]})
    if not shown:
        for ax in axes[0]:
            ax.set_axis_off()
        axes[0][0].text(0, 0.5, "no telemetry from devices serving this version in the window", fontsize=11)
    for row, cohort in zip(axes, shown, strict=False):
        ks_ax, class_ax, conf_ax, acc_ax = row
        _ks_panel(ks_ax, cohort)
        state = _state(cohort)
        ks_ax.set_title(
            f"{cohort.get('cohort', '?')}: {state} — {len(cohort.get('devices') or [])} devices, "
            f"{cohort.get('rows', 0)} rows",
            fontsize=10,
            loc="left",
            pad=16,
            color=_DRIFT if state == "DRIFTED" else "black",
            fontweight="bold" if state == "DRIFTED" else "normal",
        )
        _class_panel(class_ax, cohort, reference)
        median = ("median", cohort.get("confidence_median"), cohort.get("reference_confidence_median"))
        _pair_panel(conf_ax, "top-1 confidence", [median], percent=False)
        accuracy = [
            ("estimated", cohort.get("estimated_accuracy"), cohort.get("reference_accuracy")),
            ("labelled", _labelled(cohort), cohort.get("reference_labelled_accuracy", reference.get("accuracy"))),
        ]
        _pair_panel(acc_ax, "accuracy", accuracy, percent=True)
    fig.tight_layout()  # makes room for the suptitle too
    out = io.BytesIO()
    fig.savefig(out, format="png", metadata={"Software": None})
    return out.getvalue()
