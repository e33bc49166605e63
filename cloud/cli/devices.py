"""`edgefleet devices ...`: list the fleet, show one device and its events, enrol a device (one-time token), revoke
or decommission one, bootstrap secrets."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import typer
from rich.console import Console, Group, RenderableType
from rich.text import Text

from cloud.cli._common import JsonOpt, TokenOpt, UrlOpt, YesOpt, api_errors, connect, emit, fail, table
from cloud.client import ApiClient

__all__ = ["devices_app", "render_device"]

devices_app = typer.Typer(
    help="Devices of the fleet: list, show, events, enroll, revoke, decommission.", no_args_is_help=True
)

_COLUMNS = (
    "id",
    "enrolment",
    "status",
    "model",
    "phase",
    "generation",
    "tags",
    "inferences",
    "telemetry lost",
    "last error",
    "anomaly",
    "last seen",
)


@devices_app.command("list")
def devices_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List devices with their active model and update state."""
    with api_errors():
        body = connect(url, token).get("/devices")
    rows = [_device_row(d) for d in body["data"]]
    emit(body, as_json, lambda _: table("devices", _COLUMNS, rows, whole=["id"]))


def _device_row(d: dict[str, Any]) -> list[Any]:
    model = f"{d['active_model_name']}:{d['active_model_version']}" if d.get("active_model_name") else None
    generation = f"{d.get('reported_generation')}/{d.get('desired_generation')}"
    tags = _tags(d)
    error = f"{d['last_error_code']}: {d.get('last_error_message') or ''}" if d.get("last_error_code") else None
    return [
        d["id"],
        d.get("enrolment"),
        d["status"],
        model,
        d.get("update_phase"),
        generation,
        tags,
        d.get("inference_count"),
        _telemetry_lost(d),
        error,
        d.get("anomaly"),
        d.get("last_seen"),
    ]


def _telemetry_lost(d: dict[str, Any]) -> str | None:
    """`gaps 5, 9-12; 3 dropped`: the seqs of windows that never arrived, and windows the device dropped."""
    gaps = d.get("telemetry_gaps") or {}
    ranges = [f"{a}" if a == b else f"{a}-{b}" for a, b in gaps.get("ranges") or []]
    parts = []
    if ranges:
        more = gaps.get("count", len(ranges)) - len(ranges)
        parts.append("gaps " + ", ".join(ranges) + (f" (+{more} more)" if more > 0 else ""))
    if d.get("telemetry_dropped"):
        parts.append(f"{d['telemetry_dropped']} dropped")
    return "; ".join(parts) or None


@devices_app.command("show")
def devices_show(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="The device.")],
    events: Annotated[int, typer.Option("--events", min=0, help="How many recent events to show.")] = 10,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show device ID: status, last seen, model and variant, agent, certificate, telemetry, recent events."""
    client = connect(url, token)
    with api_errors():
        body = client.device(device_id)
        body["events"] = client.device_events(device_id, limit=events) if events else []
    emit(body, as_json, render_device)


def _event_row(e: dict[str, Any]) -> tuple[Any, ...]:
    error = f"{e['error_code']}: {e.get('error_message') or ''}" if e.get("error_code") else None
    return (e["id"], e["at"], e["kind"], e.get("generation"), e.get("phase"), e.get("message") or None, error)


_EVENT_COLUMNS = ("#", "at", "kind", "generation", "phase", "message", "error")


@devices_app.command("events")
def devices_events(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="The device.")],
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=10_000, help="How many events (newest).")] = 50,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events as they arrive, until Ctrl-C.")
    ] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.05, help="Seconds between polls with --follow.")] = 1.0,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the events of device ID, newest last; with --follow, then every new one (--json: one line each)."""
    client = connect(url, token)
    with api_errors():
        events = client.device_events(device_id, limit=limit)
    if not follow:
        body = {"data": events, "count": len(events)}
        emit(body, as_json, lambda _: table(f"events of {device_id}", _EVENT_COLUMNS, [_event_row(e) for e in events]))
        return
    _follow(client, device_id, events, interval, as_json)


def _follow(client: ApiClient, device_id: str, events: list[dict[str, Any]], interval: float, as_json: bool) -> None:
    """Print `events`, then every newer event as it is stored, one line each, until Ctrl-C (exit 0)."""
    console = Console(highlight=False, soft_wrap=True)
    after = 0  # event ids start at 1
    try:
        while True:
            for event in events:
                _print_event(console, event, as_json)
                after = max(after, int(event["id"]))
            sys.stdout.flush()
            time.sleep(interval)
            with api_errors():
                events = client.device_events(device_id, limit=1000, after_id=after)
    except KeyboardInterrupt:
        return


def _print_event(console: Console, event: dict[str, Any], as_json: bool) -> None:
    """One event as one line: JSON, or `at  kind  gen  phase  message  error`."""
    if as_json:
        typer.echo(json.dumps(event, sort_keys=True))
        return
    cells = [str(c) for c in _event_row(event)[1:] if c is not None]
    console.print(Text("  ".join(cells)))


@devices_app.command("decommission")
def devices_decommission(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="The device to retire.")],
    yes: YesOpt = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Retire device ID for good: revoke its certificates, clear its retained state, leave it out of deployments,
    rollouts and fleet counts. Its events, telemetry and deployment history stay."""
    client = connect(url, token)
    if not yes:
        typer.confirm(f"decommission {device_id}? it will be revoked and leave the fleet", abort=True)
    with api_errors():
        body = client.decommission_device(device_id)
    emit(body, as_json, lambda b: f"device {b['id']} decommissioned at {b['decommissioned_at']}")


def render_device(d: dict[str, Any]) -> RenderableType:
    """The whole of one device: identity, connectivity, model, update, certificate, telemetry, recent events."""
    model = f"{d['active_model_name']}:{d['active_model_version']}" if d.get("active_model_name") else "-"
    lines = [
        f"device {d['id']}  ({d.get('enrolment')})  status {d['status']}  last seen {d.get('last_seen') or 'never'}",
        f"tags: {_tags(d) or '-'}",
        f"model: {model}  variant: {d.get('active_variant') or '-'}  sha256: {d.get('active_model_sha256') or '-'}",
        f"agent: {d.get('agent_version') or '-'}  inference url: {d.get('inference_url') or '-'}",
        f"update: generation {d.get('reported_generation')}/{d.get('desired_generation')}  "
        f"phase {d.get('update_phase') or '-'}",
        f"certificate: {_certificate(d.get('certificate'))}",
        f"telemetry: {d.get('telemetry_windows', 0)} windows, {d.get('inference_count', 0)} inferences, "
        f"{d.get('error_count', 0)} errors; lost: {_telemetry_lost(d) or 'none'}",
    ]
    if d.get("last_error_code"):
        lines.append(f"last error: {d['last_error_code']}: {d.get('last_error_message') or ''}")
    lines += [f"{label}: {d[key]}" for key, label in (("anomaly", "anomaly"), ("decommissioned_at", "decommissioned"))
              if d.get(key)]  # fmt: skip
    parts: list[RenderableType] = [Text(line) for line in lines]
    if d.get("events"):
        parts.append(table("recent events", _EVENT_COLUMNS, [_event_row(e) for e in d["events"]]))
    return Group(*parts)


def _certificate(cert: dict[str, Any] | None) -> str:
    if cert is None:
        return "none"
    revoked = f", revoked {cert['revoked_at']}" if cert.get("revoked_at") else ""
    return f"serial {cert['serial']}, issued {cert['issued_at']}, expires {cert['not_after']}{revoked}"


def _tags(d: dict[str, Any]) -> str | None:
    return ",".join(f"{k}={v}" for k, v in sorted((d.get("tags") or {}).items())) or None


def parse_tags(items: list[str] | None) -> dict[str, str]:
    """`--tag k=v` options → a dict; `ValueError` for an item without `=`."""
    tags: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--tag {item!r} is not key=value")
        tags[key.strip()] = value.strip()
    return tags


TagOpt = Annotated[list[str] | None, typer.Option("--tag", help="key=value the device carries; repeat for more.")]


@devices_app.command("enroll")
def devices_enroll(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="The device's id (letters, digits, . _ -).")],
    tag: TagOpt = None,
    ttl: Annotated[float | None, typer.Option("--ttl", help="Seconds the token may be used (default 24 h).")] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a one-time enrolment token for device ID (its tags are set here, not by the device)."""
    try:
        body: dict[str, Any] = {"tags": parse_tags(tag)} | ({"ttl_seconds": ttl} if ttl else {})
    except ValueError as exc:
        fail(str(exc))
    with api_errors():
        answer = connect(url, token).post_json(f"/devices/{device_id}/enrolment-token", body)
    emit(
        answer,
        as_json,
        lambda a: (
            f"enrolment token for {a['device_id']} (one-time, expires {a['expires_at']}):\n"
            f"  {a['token']}\non the device run:\n  {a['command']}"
        ),
    )


@devices_app.command("revoke")
def devices_revoke(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="The device to revoke.")],
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke device ID: its certificates go on the CRL (refused at its next connect), its retained state is cleared."""
    with api_errors():
        answer = connect(url, token).post_json(f"/devices/{device_id}/revoke", {})
    emit(answer, as_json, lambda a: f"device {a['id']} revoked at {a['revoked_at']}")


secrets_app = typer.Typer(
    help="Fleet-wide bootstrap secrets for factory provisioning (weaker than per-device tokens: anyone holding "
    "one can enrol any new device id until it is revoked or expires).",
    no_args_is_help=True,
)
devices_app.add_typer(secrets_app, name="bootstrap-secret")


@secrets_app.command("create")
def secret_create(
    name: Annotated[str, typer.Argument(help="A name for the secret (e.g. the production batch).")],
    tag: TagOpt = None,
    ttl: Annotated[float | None, typer.Option("--ttl", help="Seconds it may be used (default: until revoked).")] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a bootstrap secret (shown once); devices enrol with `edgefleet-agent enroll --bootstrap-secret`."""
    try:
        body: dict[str, Any] = {"name": name, "tags": parse_tags(tag)} | ({"ttl_seconds": ttl} if ttl else {})
    except ValueError as exc:
        fail(str(exc))
    with api_errors():
        answer = connect(url, token).post_json("/bootstrap-secrets", body)
    emit(answer, as_json, lambda a: f"bootstrap secret {a['name']} (shown once):\n  {a['secret']}")


@secrets_app.command("list")
def secret_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List bootstrap secrets (never the secrets themselves)."""
    with api_errors():
        body = connect(url, token).get("/bootstrap-secrets")
    rows = [(s["name"], s["uses"], s["expires_at"], s["revoked_at"], s["created_by"]) for s in body]
    listing = {"data": body, "count": len(body)}  # every listing's --json has this shape
    emit(listing, as_json, lambda _: table("bootstrap secrets", ["name", "uses", "expires", "revoked", "by"], rows))


@secrets_app.command("revoke")
def secret_revoke(
    name: Annotated[str, typer.Argument(help="The secret's name.")],
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop a bootstrap secret from enrolling more devices."""
    with api_errors():
        answer = connect(url, token).post_json(f"/bootstrap-secrets/{name}/revoke", {})
    emit(answer, as_json, lambda a: f"bootstrap secret {a['name']} revoked")
