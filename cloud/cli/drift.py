"""`edgefleet drift ...`: is a version still right on every site? Its devices' sketches against its reference profile.

edgefleet drift show digits:1.0 --by site
edgefleet drift show digits:1.0 --by device --window 15m --json
edgefleet drift report digits:1.0 --by site -o drift.html
edgefleet drift report digits:1.0 --by site -o drift.png      # a PNG image (or --format png)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group, RenderableType
from rich.text import Text

from cloud.cli._common import JsonOpt, TokenOpt, UrlOpt, api_errors, connect, emit, fail, table

__all__ = ["drift_app", "parse_window", "render_drift", "report_format"]

drift_app = typer.Typer(
    help="Drift of a version on the fleet: per cohort, against the reference profile pushed with it.",
    no_args_is_help=True,
)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(text: str) -> int:
    """`90s`, `15m`, `1h`, `2d` or plain seconds → seconds; `ValueError` says what is accepted."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"--window {text!r}: give a duration such as 900, 15m, 1h or 2d")
    return int(match.group(1)) * _UNITS[match.group(2) or "s"]


def _target(ref: str, window: str) -> tuple[str, str, int]:
    """(name, version, window in seconds) from the command line; one error line and exit 1 when unusable."""
    name, sep, version = ref.partition(":")
    if not sep or not name or not version:
        fail(f"{ref!r}: give MODEL:VERSION, e.g. digits:1.0")
    try:
        return name, version, parse_window(window)
    except ValueError as exc:
        fail(str(exc))


def _pct(value: Any) -> str | None:
    return None if value is None else f"{100 * float(value):.1f}%"


def _num(value: Any) -> str | None:
    return None if value is None else f"{float(value):.3f}"


def _labelled(c: dict[str, Any]) -> str:
    """`91.0% (n=120)`, `MAE 0.31 (n=80)`, or `- (n=12)` below the minimum of labels."""
    n = c.get("labelled", 0)
    if c.get("labelled_accuracy") is not None:
        return f"{_pct(c['labelled_accuracy'])} (n={n})"
    if c.get("labelled_mae") is not None:
        return f"MAE {float(c['labelled_mae']):.4g} (n={n})"
    return f"- (n={n})"


def render_drift(body: dict[str, Any]) -> RenderableType:
    """One row per cohort: state, devices, rows, max KS, class PSI, confidence, estimated and labelled accuracy;
    reasons."""
    rows = []
    for c in body["cohorts"]:
        state = "DRIFTED" if c["drifted"] else ("too few rows" if c["insufficient"] else "ok")
        accuracy = f"{_pct(c['estimated_accuracy']) or '-'} / {_pct(c['reference_accuracy']) or '-'}"
        rows.append([
            c["cohort"], state, len(c["devices"]), c["rows"], _num(c["max_ks"]), _num(c["class_psi"]),
            _num(c["confidence_median"]), accuracy, _labelled(c),
        ])  # fmt: skip
    by = body["by"] or "fleet"
    title = f"drift of {body['model']}:{body['version']} by {by}, last {body['window_s']} s"
    columns = [
        "cohort", "state", "devices", "rows", "max KS", "class PSI", "confidence", "est. accuracy / ref", "labelled",
    ]  # fmt: skip
    parts: list[RenderableType] = [table(title, columns, rows, whole=["cohort"])]
    for c in body["cohorts"]:
        for reason in c["reasons"]:
            parts.append(Text(f"{c['cohort']}: {reason}"))
    if not body["cohorts"]:
        parts.append(Text("no telemetry from devices serving this version in the window"))
    return Group(*parts)


_By = Annotated[
    str | None, typer.Option("--by", help="Cohorts: a device tag key (one cohort per value, e.g. site) or `device`.")
]
_WindowOpt = Annotated[str, typer.Option("--window", help="Sliding window: seconds or 15m, 1h, 2d.")]


@drift_app.command("show")
def drift_show(
    model: Annotated[str, typer.Argument(help="MODEL:VERSION, e.g. digits:1.0.")],
    by: _By = None,
    window: _WindowOpt = "1h",
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Per cohort: feature shift (KS), class shift (PSI), confidence and estimated accuracy against the reference."""
    name, version, seconds = _target(model, window)
    with api_errors():
        body = connect(url, token).drift(name, version, by=by, window_s=seconds)
    emit(body, as_json, render_drift)


_FORMATS = ("html", "png")


def report_format(out: Path | None, fmt: str | None) -> str:
    """`html` or `png`: `--format` if given, else the suffix of `-o`, else html; `ValueError` when unusable."""
    if fmt is not None:
        if fmt.lower() not in _FORMATS:
            raise ValueError(f"--format {fmt!r}: give html or png")
        return fmt.lower()
    suffix = out.suffix.lower().lstrip(".") if out is not None else ""
    if suffix in ("htm", "html", ""):
        return "html"
    if suffix == "png":
        return "png"
    raise ValueError(f"-o {out}: cannot tell the format from .{suffix}; name it .html or .png, or give --format")


@drift_app.command("report")
def drift_report(
    model: Annotated[str, typer.Argument(help="MODEL:VERSION, e.g. digits:1.0.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Where to write it (default drift.html or drift.png).")
    ] = None,
    fmt: Annotated[
        str | None, typer.Option("--format", "-f", help="html or png (default: from the -o suffix, else html).")
    ] = None,
    by: _By = None,
    window: _WindowOpt = "1h",
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Write the drift report: one self-contained HTML page (tables and charts, no scripts, opens offline), or one
    PNG image of the same charts."""
    name, version, seconds = _target(model, window)
    try:
        kind = report_format(out, fmt)
    except ValueError as exc:
        fail(str(exc))
    path = out if out is not None else Path(f"drift.{kind}")
    with api_errors():
        client = connect(url, token)
        if kind == "png":
            data = client.drift_report_png(name, version, by=by, window_s=seconds)
        else:
            data = client.drift_report(name, version, by=by, window_s=seconds).encode("utf-8")
    path.write_bytes(data)
    typer.echo(f"wrote {path} ({len(data)} bytes)")
