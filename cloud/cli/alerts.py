"""`edgefleet alerts ...`: alerts on error rate, latency, offline devices and stuck rollouts: list, show, ack, rules."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.markup import escape
from rich.text import Text

from cloud.cli._common import JsonOpt, TokenOpt, UrlOpt, api_errors, connect, emit, fail, table

__all__ = ["alerts_app", "render_rules", "rules_app"]

alerts_app = typer.Typer(
    help="Alerts: one per rule, cohort and model while its condition holds, resolved by themselves (docs/alerts.md).",
    no_args_is_help=True,
)


class StateChoice(StrEnum):
    """Which alerts to list."""

    OPEN = "open"
    ACKED = "acked"
    RESOLVED = "resolved"
    UNRESOLVED = "unresolved"
    ALL = "all"


def _model(alert: dict[str, Any]) -> str | None:
    return alert.get("model_name")


def _row(a: dict[str, Any]) -> tuple[Any, ...]:
    return (
        a["id"],
        a["state"],
        a["severity"],
        a["rule"],
        escape(a["cohort"]),
        _model(a),
        f"{a['last_value']:.4g}",
        f"{a['threshold']:g}",
        a["opened_at"],
        a.get("resolved_at"),
        a.get("acked_by"),
    )


_COLUMNS = [
    "id",
    "state",
    "severity",
    "rule",
    "cohort",
    "model",
    "value",
    "threshold",
    "opened",
    "resolved",
    "acked by",
]


@alerts_app.command("list")
def alerts_list(
    state: Annotated[
        StateChoice, typer.Option("--state", help="open, acked, resolved, unresolved (open or acked) or all.")
    ] = StateChoice.UNRESOLVED,
    rule: Annotated[str | None, typer.Option("--rule", help="Only this rule, e.g. error_rate.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Only alerts about this model.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="How many alerts.")] = 100,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List alerts, newest first (default: the unresolved ones)."""
    with api_errors():
        data = connect(url, token).alerts(state=state.value, rule=rule, model=model, limit=limit)
    body = {"data": data, "count": len(data)}  # the listing shape every `--json` listing prints
    emit(
        body,
        as_json,
        lambda b: table(f"alerts ({state.value})", _COLUMNS, [_row(a) for a in b["data"]], whole=["id"]),
    )


@alerts_app.command("show")
def alerts_show(
    alert_id: Annotated[int, typer.Argument(help="Alert id.", min=1)],
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One alert: its condition, values, acknowledgement and webhook deliveries."""
    with api_errors():
        alert = connect(url, token).alert(alert_id)
    emit(alert, as_json, _render_alert)


def _render_alert(a: dict[str, Any]) -> Group:
    lines = [
        f"alert {a['id']}  {a['state']}  {a['severity']}  rule {a['rule']}  cohort {escape(a['cohort'])}"
        + (f"  model {escape(a['model_name'])}" if a.get("model_name") else ""),
        escape(a["message"]),
        f"value {a['last_value']:.4g} (first {a['first_value']:.4g}), threshold {a['threshold']:g}",
        f"opened {a['opened_at']}, last seen {a['last_seen_at']}, resolved {a.get('resolved_at') or '-'}",
    ]
    if a.get("acked_by"):
        note = f": {escape(a['ack_note'])}" if a.get("ack_note") else ""
        lines.append(f"acknowledged by {escape(a['acked_by'])} at {a['acked_at']}{note}")
    parts: list[Any] = [Text.from_markup("\n".join(lines))]
    deliveries = a.get("deliveries") or []
    if deliveries:
        rows = [
            (
                d["event"],
                escape(d["url"]),
                d["state"],
                d["attempts"],
                d.get("delivered_at"),
                escape(d.get("last_error") or ""),
            )
            for d in deliveries
        ]
        parts.append(
            table("webhook deliveries", ["event", "url", "state", "attempts", "delivered", "last error"], rows)
        )
    return Group(*parts)


@alerts_app.command("ack")
def alerts_ack(
    alert_id: Annotated[int, typer.Argument(help="Alert id.", min=1)],
    note: Annotated[str | None, typer.Option("--note", help="Why, or who is on it (kept with the alert).")] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Acknowledge an open alert (operator): it stays unresolved until its condition goes."""
    with api_errors():
        alert = connect(url, token).ack_alert(alert_id, note)
    emit(alert, as_json, lambda a: f"alert {a['id']} acknowledged by {escape(a['acked_by'])}: {escape(a['message'])}")


rules_app = typer.Typer(
    help="The rules evaluated, and operators' overrides of them per model or fleet-wide: set, reset.",
    invoke_without_command=True,
)
alerts_app.add_typer(rules_app, name="rules")


def _source(where: str) -> str:
    return {"settings": "settings", "*": "fleet override", "model": "model override"}.get(where, where)


def render_rules(body: dict[str, Any]) -> Group:
    """One row per rule as evaluated fleet-wide, then one per model with its own override; the source of each value."""
    rows: list[tuple[Any, ...]] = []
    for r in body["data"]:
        threshold_from, enabled_from = r.get("threshold_from", "settings"), r.get("enabled_from", "settings")
        rows.append((
            r["name"], "*", "on" if r.get("enabled", True) else "OFF", _source(enabled_from),
            f"{r['op']} {r['threshold']:g}", _source(threshold_from), r["metric"], r["by"],
            f"{r['min_weight']:g}" if r["min_weight"] else None, r["severity"],
        ))  # fmt: skip
        for m in r.get("models", []):
            rows.append((
                r["name"], m["model"], "on" if m["enabled"] else "OFF", _source(m["enabled_from"]),
                f"{r['op']} {m['threshold']:g}", _source(m["threshold_from"]), None, None, None, None,
            ))  # fmt: skip
    every = f"every {body['tick_s']:g} s" if body["tick_s"] else "off (alert_tick_s = 0)"
    title = (
        f"alert rules ({every}; resolved after {body['resolve_after']} quiet evaluations; {body['webhooks']} webhooks)"
    )
    columns = ["rule", "model", "state", "state from", "alert when", "threshold from", "metric", "cohorts by",
               "min data", "severity"]  # fmt: skip
    described = [Text(f"{r['name']}: {r['description']}") for r in body["data"] if r.get("description")]
    return Group(table(title, columns, rows, whole=["rule", "model"]), *described)


@rules_app.callback()
def alerts_rules(ctx: typer.Context, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """The rules evaluated: condition, cohorts, minimum data, severity; per model where an operator changed them,
    with where each value comes from (settings, fleet override, model override)."""
    if ctx.invoked_subcommand is not None:
        return
    with api_errors():
        body = connect(url, token).alert_rules()
    emit(body, as_json, render_rules)


_ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="The model it applies to (default: fleet-wide, every model).")
]


@rules_app.command("set")
def alerts_rules_set(
    rule: Annotated[str, typer.Argument(help="The rule, e.g. error_rate (`edgefleet alerts rules` lists them).")],
    model: _ModelOpt = None,
    threshold: Annotated[float | None, typer.Option("--threshold", help="Its threshold for the model.")] = None,
    off: Annotated[bool, typer.Option("--off", help="Switch the rule off for the model.")] = False,
    on: Annotated[bool, typer.Option("--on", help="Switch it on (over a fleet-wide --off).")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Override a rule for one model (or fleet-wide): a threshold of its own, or switched off or on (operator)."""
    if off and on:
        fail("give --off or --on, not both")
    if threshold is None and not (off or on):
        fail("give --threshold X, --off or --on")
    enabled = False if off else (True if on else None)
    with api_errors():
        body = connect(url, token).set_alert_rule(rule, model=model, enabled=enabled, threshold=threshold)
    emit(body, as_json, render_rules)


@rules_app.command("reset")
def alerts_rules_reset(
    rule: Annotated[str, typer.Argument(help="The rule, e.g. error_rate.")],
    model: _ModelOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove a rule's override for a model (or the fleet-wide one): the level below applies again (operator)."""
    with api_errors():
        body = connect(url, token).reset_alert_rule(rule, model=model)
    emit(body, as_json, render_rules)
