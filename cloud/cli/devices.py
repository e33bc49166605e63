"""`edgefleet devices ...`: list the fleet, enrol a device (one-time token), revoke one, bootstrap secrets."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cloud.cli._common import JsonOpt, TokenOpt, UrlOpt, api_errors, connect, emit, fail, table

__all__ = ["devices_app"]

devices_app = typer.Typer(help="Devices of the fleet: list, enroll, revoke.", no_args_is_help=True)

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
    emit(body, as_json, lambda _: table("devices", _COLUMNS, rows))


def _device_row(d: dict[str, Any]) -> list[Any]:
    model = f"{d['active_model_name']}:{d['active_model_version']}" if d.get("active_model_name") else None
    generation = f"{d.get('reported_generation')}/{d.get('desired_generation')}"
    tags = ",".join(f"{k}={v}" for k, v in sorted((d.get("tags") or {}).items())) or None
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
    emit(body, as_json, lambda _: table("bootstrap secrets", ["name", "uses", "expires", "revoked", "by"], rows))


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
