"""`edgefleet rollouts ...`: create quality-gated rollouts, watch their waves and gates, pause/resume/abort/promote.

Plan syntax on the command line (the same plan as the REST body, see docs/rollouts.md)::

    edgefleet rollouts create digits:2.0 --from 1.0 --to site=lab \\
        --waves 1%,10%,50%,100% --bake 30m --on-failure rollback \\
        --gate 'psi<0.2' --gate 'p95<1.3' --gate 'errors<0.01' --min-samples 500 --max-concurrent 20

- `--to`: tag=value (ANDed) and/or device ids; omitted: the whole fleet. `--percent P` keeps P % of them.
- `--waves`: cumulative sizes, `N%` of the selected devices or a plain device count (`2,50%,100%`).
- `--bake`, `--max-data-wait`, `--device-timeout`: `90`, `30s`, `5m`, `1h`.
- `--gate NAME<VALUE` or `NAME=off`, NAME one of installs, errors, p95, psi, js.
- `--baseline control|absolute` (default: control with `--from`, absolute without), `--max-error-rate R`,
  `--max-p95-ms MS`: absolute limits, e.g. for the first rollout of a new model.

Waves are numbered from 1 wherever a person reads them (tables, messages, `promote --wave N`).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from cloud.cli._common import (
    JsonOpt,
    TokenOpt,
    UrlOpt,
    api_errors,
    connect,
    counts,
    emit,
    fail,
    parse_model_ref,
    table,
)
from cloud.client import ApiClient

__all__ = [
    "GATE_NAMES",
    "build_plan",
    "parse_bake",
    "parse_gate",
    "parse_limit",
    "parse_waves",
    "promote_body",
    "render_status",
    "rollouts_app",
]

rollouts_app = typer.Typer(help="Quality-gated rollouts in waves (see docs/rollouts.md).", no_args_is_help=True)

GATE_NAMES = {
    "installs": "max_install_failure_rate",
    "errors": "max_error_rate_increase",
    "p95": "max_p95_latency_ratio",
    "psi": "max_psi",
    "js": "max_js_divergence",
}
ENDED = frozenset({"completed", "aborted", "rolled_back"})
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h)?$")
_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_bake(text: str, option: str = "--bake") -> float:
    """`90`, `30s`, `5m`, `1h` → seconds (`option` names the option in the error)."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"{option} {text!r}: use seconds or a number with s, m or h (e.g. 30s, 5m)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_limit(text: str, option: str) -> float | None:
    """An absolute limit: a number, or `off` (None: the gate disabled)."""
    if text.strip().lower() == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{option} {text!r}: use a number, or off") from None
    if value < 0:
        raise ValueError(f"{option} {text!r}: must not be negative")
    return value


def parse_waves(text: str, bake_seconds: float | None = None) -> list[dict[str, Any]]:
    """`1%,10%,100%` or `2,50%,100%` → wave dicts (percent of the selected devices, or device counts)."""
    waves: list[dict[str, Any]] = []
    for part in (p.strip() for p in text.split(",")):
        try:
            wave: dict[str, Any] = {"percent": float(part[:-1])} if part.endswith("%") else {"count": int(part)}
        except ValueError:
            raise ValueError(f"--waves: {part!r} is neither N% nor a device count") from None
        if bake_seconds is not None:
            wave["bake_seconds"] = bake_seconds
        waves.append(wave)
    if not waves:
        raise ValueError("--waves is empty")
    return waves


def parse_gate(text: str) -> tuple[str, float | None]:
    """`psi<0.25` → (`max_psi`, 0.25); `psi=off` → (`max_psi`, None)."""
    name, sep, value = text.replace("<=", "<").partition("<")
    if not sep:
        name, sep, value = text.partition("=")
        if value.strip().lower() != "off":
            raise ValueError(f"--gate {text!r}: use NAME<VALUE or NAME=off")
    field = GATE_NAMES.get(name.strip().lower())
    if field is None:
        raise ValueError(f"--gate {text!r}: unknown gate {name!r}; one of {', '.join(GATE_NAMES)}")
    if value.strip().lower() == "off":
        return field, None
    try:
        return field, float(value)
    except ValueError:
        raise ValueError(f"--gate {text!r}: {value!r} is not a number") from None


def build_plan(
    model: str,
    *,
    previous: str | None,
    to: list[str],
    percent: float,
    waves: str | None,
    bake: str | None,
    on_failure: str,
    gates: list[str],
    min_samples: int | None,
    max_concurrent: int | None,
    timeout: str | None,
    retries: int | None,
    baseline: str | None = None,
    max_error_rate: str | None = None,
    max_p95_ms: str | None = None,
    max_data_wait: str | None = None,
) -> dict[str, Any]:
    """The REST plan body from the command's options; `ValueError` names the bad option."""
    ref = parse_model_ref(model)  # NAME@ALIAS: the coordinator resolves it when it creates the rollout
    plan: dict[str, Any] = {"model": str(ref) if ref.alias else ref.name, "on_gate_failure": on_failure}
    if ref.version:
        plan["version"] = ref.version
    if previous:
        plan["previous_version"] = previous
    if baseline is not None:
        if baseline not in {"control", "absolute"}:
            raise ValueError(f"--baseline {baseline!r}: use control or absolute")
        plan["baseline"] = baseline
    tags = dict(t.split("=", 1) for t in to if "=" in t)
    plan["selector"] = {"tags": tags, "device_ids": [t for t in to if "=" not in t], "percent": percent}
    bake_seconds = parse_bake(bake) if bake is not None else None
    if waves is not None:
        plan["waves"] = parse_waves(waves, bake_seconds)
    elif bake_seconds is not None:
        plan["waves"] = parse_waves("1%,10%,50%,100%", bake_seconds)
    thresholds: dict[str, Any] = dict(parse_gate(g) for g in gates)
    if min_samples is not None:
        thresholds |= {"min_inferences": min_samples, "min_class_samples": min_samples}
    if max_error_rate is not None:
        thresholds["max_error_rate"] = parse_limit(max_error_rate, "--max-error-rate")
    if max_p95_ms is not None:
        thresholds["max_p95_ms"] = parse_limit(max_p95_ms, "--max-p95-ms")
    if thresholds:
        plan["gates"] = thresholds
    if max_concurrent is not None:
        plan["max_concurrent_downloads"] = max_concurrent
    if timeout is not None:
        plan["device_timeout_seconds"] = parse_bake(timeout, "--device-timeout")
    if max_data_wait is not None:
        plan["max_data_wait_seconds"] = parse_bake(max_data_wait, "--max-data-wait")
    if retries is not None:
        plan["max_retries"] = retries
    return plan


@rollouts_app.command("create")
def create(
    model: Annotated[
        str,
        typer.Argument(
            metavar="NAME:VERSION|NAME@ALIAS",
            help="The version to roll out, e.g. digits:2.0, or the one an alias names now: digits@production.",
        ),
    ],
    previous: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="The version devices run now; a rollback returns to it. Omit it for a new model: its gates are "
            "then absolute limits (see --baseline).",
        ),
    ] = None,
    to: Annotated[
        list[str] | None, typer.Option("--to", help="tag=value (ANDed) or a device id; repeat. Default: all devices.")
    ] = None,
    percent: Annotated[float, typer.Option("--percent", help="Share of the matching devices to take.")] = 100.0,
    waves: Annotated[
        str | None, typer.Option("--waves", help="Cumulative wave sizes: 1%,10%,50%,100% or counts like 2,50%,100%.")
    ] = None,
    bake: Annotated[str | None, typer.Option("--bake", help="Bake time of each wave: 90, 30s, 5m, 1h.")] = None,
    on_failure: Annotated[
        str, typer.Option("--on-failure", help="What a failed gate does: pause or rollback (needs --from).")
    ] = "pause",
    gate: Annotated[
        list[str] | None,
        typer.Option(
            "--gate",
            help="'NAME<VALUE' (quoted: < is a shell redirect) or NAME=off; NAME: installs, errors, p95, psi, js. "
            "Repeat.",
        ),
    ] = None,
    min_samples: Annotated[
        int | None, typer.Option("--min-samples", help="Inferences/predictions per cohort before a gate decides.")
    ] = None,
    max_concurrent: Annotated[
        int | None, typer.Option("--max-concurrent", help="Devices installing at the same time.")
    ] = None,
    device_timeout: Annotated[
        str | None, typer.Option("--device-timeout", help="An attempt without result after this fails (e.g. 15m).")
    ] = None,
    retries: Annotated[int | None, typer.Option("--retries", help="Attempts after the first, with backoff.")] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            "--baseline",
            help="What gates judge against: control (the devices still on --from; the default with --from) or "
            "absolute (the limits below; the default without --from, e.g. a new model).",
        ),
    ] = None,
    max_error_rate: Annotated[
        str | None,
        typer.Option("--max-error-rate", help="Absolute limit on the updated devices' error rate (0.01 = 1%), or off."),
    ] = None,
    max_p95_ms: Annotated[
        str | None, typer.Option("--max-p95-ms", help="Absolute limit on the updated devices' p95 latency, or off.")
    ] = None,
    max_data_wait: Annotated[
        str | None,
        typer.Option(
            "--max-data-wait",
            help="How long gates may wait for enough samples after a wave's bake before the rollout pauses "
            "(e.g. 10m; default 1h).",
        ),
    ] = None,
    plan_file: Annotated[
        Path | None,
        typer.Option("--plan", exists=True, dir_okay=False, help="A JSON plan; the options above are ignored."),
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a rollout of NAME:VERSION in waves, each baked and judged against a control cohort or absolute limits.

    Example: edgefleet rollouts create digits:2.0 --from 1.0 --to site=lab --waves 2,50%,100% --bake 5m
    --on-failure rollback --gate 'psi<0.2' --gate 'p95<1.3' --min-samples 500 --max-concurrent 20

    A new model (no --from): edgefleet rollouts create ocr:1.0 --to site=lab --waves 1,100% --bake 5m
    --max-error-rate 0.01 --max-p95-ms 50

    Waves are cumulative: N% of the selected devices, or a plain device count. A gate is NAME<VALUE or
    NAME=off, NAME one of installs (failure rate), errors (error rate increase), p95 (latency ratio),
    psi or js (class shift); the last four compare with the control cohort and do not apply under
    --baseline absolute. See docs/rollouts.md.
    """
    try:
        if plan_file is not None:
            plan = json.loads(plan_file.read_text())
        else:
            plan = build_plan(
                model,
                previous=previous,
                to=to or [],
                percent=percent,
                waves=waves,
                bake=bake,
                on_failure=on_failure,
                gates=gate or [],
                min_samples=min_samples,
                max_concurrent=max_concurrent,
                timeout=device_timeout,
                retries=retries,
                baseline=baseline,
                max_error_rate=max_error_rate,
                max_p95_ms=max_p95_ms,
                max_data_wait=max_data_wait,
            )
    except (ValueError, OSError) as exc:
        fail(str(exc))
    with api_errors():
        body = connect(url, token).post_json("/rollouts", plan)
    emit(body, as_json, lambda b: f"rollout {b['id']}: {b['model_name']}:{b['model_version']} created ({b['status']})")


@rollouts_app.command("list")
def list_(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List rollouts, newest first."""
    with api_errors():
        body = connect(url, token).get("/rollouts")
    rows = [
        (
            r["id"],
            f"{r['model_name']}:{r['model_version']}",
            r["status"],
            f"{r['current_wave'] + 1}/{r['wave_count']}",
            counts(r["counts"]),
            r.get("reason"),
            r["updated_at"],
        )
        for r in body["data"]
    ]
    columns = ["id", "model", "status", "wave", "devices", "reason", "updated"]
    emit(body, as_json, lambda _: table("rollouts", columns, rows))


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / total) if total else 0
    return "█" * filled + "░" * (width - filled) + f" {done}/{total}"


def render_status(body: dict[str, Any], decisions: int = 8) -> Group:
    """The rich view of a rollout: header, per-wave progress bars, gate figures, last decisions."""
    parts: list[Any] = [_header(body), _waves_table(body["waves"])]
    gates = body.get("gates")
    if gates and gates.get("results"):
        parts.append(_gates_table(gates))
    recent = body["decisions"][-decisions:]
    if recent:
        rows = [(d["seq"], d["at"], d["kind"], d["message"]) for d in recent]
        parts.append(table("last decisions", ["#", "at", "kind", "message"], rows))
    return Group(*parts)


def _header(body: dict[str, Any]) -> str:
    baseline = body.get("baseline") or "control"
    text = (
        f"[bold]rollout {body['id']}[/] {body['model_name']}:{body['model_version']}"
        f" (from {body.get('previous_version') or '-'}, gates on {baseline} baseline) — [bold]{body['status']}[/],"
        f" wave {body['current_wave'] + 1}/{body['wave_count']}, {body['device_count']} devices"
        + (f" — {body['reason']}" if body.get("reason") else "")
    )
    if body.get("waiting"):
        text += f"\n[yellow]waiting:[/] {body['waiting']}"
    return text


def _waves_table(waves: list[dict[str, Any]]) -> Table:
    out = Table(title="waves", title_justify="left")
    for column in ("wave", "size", "bake", "state", "updated", "other phases"):
        out.add_column(column)
    for wave in waves:
        others = dict(wave["counts"])
        done = others.pop("succeeded", 0)
        out.add_row(
            str(wave["index"] + 1),
            wave["size"],
            f"{wave['bake_seconds']:g}s",
            wave["state"],
            _bar(done, wave["devices"]),
            counts(others),
        )
    return out


def _gates_table(gates: dict[str, Any]) -> Table:
    title = f"gates of wave {int(gates.get('wave') or 0) + 1} ({'live' if gates.get('live') else 'last verdict'})"
    rows = [
        (
            r["name"],
            r["verdict"],
            "-" if r["observed"] is None else f"{r['observed']:.4g}",
            f"{r['threshold']:g}",
            r["reason"],
        )
        for r in gates["results"]
    ]
    return table(title, ["gate", "verdict", "observed", "threshold", "why"], rows)


@rollouts_app.command("status")
def status(
    rollout_id: Annotated[int, typer.Argument(metavar="ID", help="Rollout id.")],
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until the rollout ends.")] = False,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between refreshes.")] = 1.0,
    timeout: Annotated[float, typer.Option("--timeout", help="Stop watching after this many seconds.")] = 3600.0,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a rollout's waves, gate figures and decisions; with --watch, live until it completes or stops."""
    client = connect(url, token)
    with api_errors():
        body = client.rollout(rollout_id)
    if not watch:
        emit(body, as_json, render_status)
    elif as_json:
        _watch_json(client, rollout_id, body, interval, timeout)
    else:
        _watch_live(client, rollout_id, body, interval, timeout)


def _watch_live(client: ApiClient, rollout_id: int, body: dict[str, Any], interval: float, timeout: float) -> None:
    """Redraw the rollout in place until it ends (or `timeout`)."""
    deadline = time.monotonic() + timeout
    with Live(render_status(body), console=Console(highlight=False), refresh_per_second=4) as live:
        while body["status"] not in ENDED and time.monotonic() < deadline:
            time.sleep(interval)
            with api_errors():
                body = client.rollout(rollout_id, devices=False)  # the view shows counts, not device rows
            live.update(render_status(body))
    if body["status"] not in ENDED:
        fail(f"rollout {rollout_id} is still {body['status']} after {timeout:g}s")


def _watch_json(client: ApiClient, rollout_id: int, body: dict[str, Any], interval: float, timeout: float) -> None:
    """One JSON line per change of status, wave or device counts, then the final rollout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        key = (body["status"], body["current_wave"], json.dumps(body["counts"], sort_keys=True))
        if key != last:
            line = {k: body.get(k) for k in ("id", "status", "current_wave", "current_wave_number", "counts", "reason")}
            typer.echo(json.dumps(line, sort_keys=True))
            last = key
        if body["status"] in ENDED or time.monotonic() >= deadline:
            break
        time.sleep(interval)
        with api_errors():
            body = client.rollout(rollout_id, devices=False)  # each line holds counts, not device rows
    if body["status"] not in ENDED:
        fail(f"rollout {rollout_id} is still {body['status']} after {timeout:g}s")


def _command(
    rollout_id: int, name: str, body: dict[str, Any], url: str | None, token: str | None, as_json: bool
) -> None:
    with api_errors():
        answer = connect(url, token).post_json(f"/rollouts/{rollout_id}/{name}", body)
    rollout = answer["rollout"]
    done = "applied" if answer["applied"] else "queued for the next step"
    emit(answer, as_json, lambda _: f"rollout {rollout_id}: {name} {done}; status {rollout['status']}")


@rollouts_app.command("pause")
def pause(
    rollout_id: Annotated[int, typer.Argument(metavar="ID")],
    reason: Annotated[str, typer.Option("--reason", help="Recorded with the decision.")] = "paused by operator",
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop dispatching (installs in flight still report)."""
    _command(rollout_id, "pause", {"reason": reason}, url, token, as_json)


@rollouts_app.command("resume")
def resume(
    rollout_id: Annotated[int, typer.Argument(metavar="ID")],
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Continue a paused rollout (a bake in progress starts over)."""
    _command(rollout_id, "resume", {}, url, token, as_json)


@rollouts_app.command("abort")
def abort(
    rollout_id: Annotated[int, typer.Argument(metavar="ID")],
    rollback: Annotated[bool, typer.Option("--rollback", help="Send every touched device back to --from.")] = False,
    reason: Annotated[str, typer.Option("--reason", help="Recorded with the decision.")] = "aborted by operator",
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop the rollout for good, optionally rolling the updated devices back."""
    _command(rollout_id, "abort", {"rollback": rollback, "reason": reason}, url, token, as_json)


def promote_body(wave: int | None, to_percent: float | None) -> dict[str, Any]:
    """The body of `POST /rollouts/{id}/promote` from `--wave N` (from 1) or `--to-percent P`."""
    if wave is not None and to_percent is not None:
        raise ValueError("use --wave or --to-percent, not both")
    if wave is not None:
        return {"wave_number": wave}
    return {"to_percent": to_percent} if to_percent is not None else {}


@rollouts_app.command("promote")
def promote(
    rollout_id: Annotated[int, typer.Argument(metavar="ID")],
    wave: Annotated[
        int | None,
        typer.Option("--wave", min=1, help="Start this wave now (numbered from 1, as `status` shows them)."),
    ] = None,
    to_percent: Annotated[
        float | None,
        typer.Option(
            "--to-percent",
            min=0,
            max=100,
            help="Start the furthest wave that keeps at most this share of the selected devices on the new version.",
        ),
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Skip the rest of the current wave's bake and gates and start the next wave now, or a later one.

    With --wave N or --to-percent P the waves in between are promoted too: their devices install along with
    the target wave. A promotion never goes past what was asked (e.g. --to-percent 30 with waves at 10% and
    50% stops at the 10% wave, and is refused if that wave is already under way).
    """
    try:
        body = promote_body(wave, to_percent)
    except ValueError as exc:
        fail(str(exc))
    _command(rollout_id, "promote", body, url, token, as_json)
