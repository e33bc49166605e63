"""THE typed client of the coordinator's `/api/v1`, used by the CLI, the simulators, the demo and the benchmarks.

Every method names the resource it reads or changes and returns the JSON body the API documents (dicts
and lists, as the OpenAPI schema at `/openapi.json` describes them). A refusal or an unreachable
coordinator is one `ApiError` whose `str()` is the line to show a person; `status` is the HTTP status
(None when the coordinator could not be reached).
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from protocol.manifest import ManifestVariant, read_manifest
from protocol.profiles import PROFILE_FILE

__all__ = [
    "API_PREFIX",
    "REPORT_FILE",
    "TRAINABLE_FILE",
    "ApiClient",
    "ApiError",
    "CliConfig",
    "compression_report_field",
    "config_path",
    "profile_field",
    "read_config",
    "variant_fields",
    "write_config_if_absent",
]

API_PREFIX = "/api/v1"


class ApiError(Exception):
    """The coordinator refused a request or could not be reached; `str()` is the line to show."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ApiClient:
    """Calls `/api/v1` on `url` (the coordinator's base URL), with `token` as bearer on every request."""

    url: str
    token: str | None = None
    timeout: float = 60.0
    # Sends the requests instead of `httpx.request` (with its own timeouts): an `httpx.Client`'s `request` for
    # connection reuse, or an in-process app's `TestClient.request` in tests.
    send: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")

    # -- generic -----------------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send `method` to `/api/v1{path}`; the decoded JSON body (None when empty), else `ApiError`."""
        response = self.raw(method, path, **kwargs)
        return response.json() if response.content else None

    def raw(self, method: str, path: str, *, headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
        """Send `method` to `/api/v1{path}`; the response (its status below 400), else `ApiError`."""
        sent = ({"Authorization": f"Bearer {self.token}"} if self.token else {}) | (headers or {})
        url = f"{self.url}{API_PREFIX}{path}"
        try:
            if self.send is not None:
                response = self.send(method, url, headers=sent, **kwargs)
            else:
                response = httpx.request(method, url, headers=sent, timeout=self.timeout, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach the coordinator at {self.url}: {exc}") from exc
        if response.status_code >= 400:
            raise ApiError(f"{_detail(response)} (HTTP {response.status_code})", status=response.status_code)
        return response

    def get(self, path: str, **params: Any) -> Any:
        """GET a resource under `/api/v1`."""
        return self.request("GET", path, params=params or None)

    def post_json(self, path: str, body: dict[str, Any]) -> Any:
        """POST a JSON body under `/api/v1`."""
        return self.request("POST", path, json=body)

    def put_json(self, path: str, body: dict[str, Any]) -> Any:
        """PUT a JSON body under `/api/v1`."""
        return self.request("PUT", path, json=body)

    def delete(self, path: str) -> Any:
        """DELETE a resource under `/api/v1`."""
        return self.request("DELETE", path)

    # -- system ------------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Coordinator version, MQTT URL and topic base."""
        return dict(self.get("/info"))

    def stats(self) -> dict[str, Any]:
        """The coordinator's MQTT ingest counters."""
        return dict(self.get("/stats"))

    # -- models ------------------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        """Every model with its versions."""
        return list(self.get("/models")["data"])

    def model(self, name: str) -> dict[str, Any]:
        """One model with its versions (lineage and compression reports included)."""
        return dict(self.get(f"/models/{name}"))

    def model_version(self, name: str, version: str) -> dict[str, Any]:
        """One model version."""
        return dict(self.get(f"/models/{name}/versions/{version}"))

    def delete_model_version(self, name: str, version: str) -> dict[str, Any]:
        """Delete `name:version` (refused while anything uses it); the artifacts removed with it."""
        return dict(self.delete(f"/models/{name}/versions/{version}"))

    def aliases(self, name: str) -> list[dict[str, Any]]:
        """The aliases of model `name` and the versions they point at."""
        return list(self.get(f"/models/{name}/aliases")["data"])

    def set_alias(self, name: str, alias: str, version: str) -> dict[str, Any]:
        """Point `name@alias` at `version` (creating or moving the alias)."""
        return dict(self.put_json(f"/models/{name}/aliases/{alias}", {"version": version}))

    def delete_alias(self, name: str, alias: str) -> dict[str, Any]:
        """Remove `name@alias`; the change as recorded."""
        return dict(self.delete(f"/models/{name}/aliases/{alias}"))

    def alias_history(self, name: str, alias: str | None = None) -> list[dict[str, Any]]:
        """Every set, move and delete of the aliases of `name` (or of one alias), oldest first."""
        params = {"alias": alias} if alias else {}
        return list(self.get(f"/models/{name}/alias-history", **params)["data"])

    def push_model(
        self, file: Path, *, name: str, version: str, fields: dict[str, str] | None = None, inputs: str | None = None
    ) -> dict[str, Any]:
        """Upload a model file as `name:version` (`fields`: form fields such as format, outputs, variant)."""
        data = {"version": version, **(fields or {})} | ({"inputs": inputs} if inputs else {})
        with file.open("rb") as fh:
            files = {"file": (file.name, fh, "application/octet-stream")}
            return dict(self.request("POST", f"/models/{name}/versions", data=data, files=files))

    def add_variant(self, file: Path, *, name: str, version: str, fields: dict[str, str]) -> dict[str, Any]:
        """Upload a file as another variant of `name:version`."""
        with file.open("rb") as fh:
            files = {"file": (file.name, fh, "application/octet-stream")}
            return dict(self.request("POST", f"/models/{name}/versions/{version}/variants", data=fields, files=files))

    def push_variants(
        self,
        directory: Path,
        *,
        name: str,
        version: str,
        risk_class: str | None = None,
        on_variant: Callable[[ManifestVariant], None] | None = None,
    ) -> dict[str, Any]:
        """Push a directory written by `edgefleet compress` as `name:version`: its primary variant as the version
        (with the compression report and the reference profile), then every other variant; the version as it then
        stands.

        Raises `ManifestError` for an unusable variants.json and `ValueError` for an unusable report.json. The
        trainable form (`trainable.pt2`) is not pushed here: `push_trainable` does that once the version exists.
        """
        manifest = read_manifest(directory)
        fields = variant_fields(manifest.primary) | compression_report_field(directory) | profile_field(directory)
        if risk_class is not None:
            fields["risk_class"] = risk_class
        body = self.push_model(directory / manifest.primary.file, name=name, version=version, fields=fields)
        for entry in manifest.variants:
            if entry.sha256 == body["sha256"]:
                continue  # the primary itself
            body = self.add_variant(directory / entry.file, name=name, version=version, fields=variant_fields(entry))
            if on_variant is not None:
                on_variant(entry)
        return body

    def push_trainable(self, name: str, version: str, path: Path) -> dict[str, Any]:
        """Upload the trainable form (a torch.export `.pt2` program) of `name:version`; the version as it then is."""
        body = path.read_bytes()
        headers = {"Content-Type": "application/octet-stream"}
        return dict(self.request("PUT", f"/models/{name}/versions/{version}/trainable", content=body, headers=headers))

    def trainable(self, name: str, version: str) -> bytes:
        """The trainable form (`.pt2` bytes) of `name:version`."""
        return bytes(self.raw("GET", f"/models/{name}/versions/{version}/trainable").content)

    # -- drift ----------------------------------------------------------------------------------------

    def drift(self, name: str, version: str, *, by: str | None = None, window_s: int | None = None) -> dict[str, Any]:
        """Drift of `name:version` per cohort (a tag key, `device`, or the fleet) against its reference profile."""
        params = {k: v for k, v in (("by", by), ("window_s", window_s)) if v is not None}
        return dict(self.get(f"/drift/{name}/{version}", **params))

    def drift_report(self, name: str, version: str, *, by: str | None = None, window_s: int | None = None) -> str:
        """The drift report of `name:version` as a self-contained HTML page."""
        params = {k: v for k, v in (("by", by), ("window_s", window_s)) if v is not None}
        return str(self.raw("GET", f"/drift/{name}/{version}/report", params=params or None).text)

    def drift_report_png(self, name: str, version: str, *, by: str | None = None, window_s: int | None = None) -> bytes:
        """The drift report of `name:version` as a PNG image."""
        params = {"format": "png", **{k: v for k, v in (("by", by), ("window_s", window_s)) if v is not None}}
        return bytes(self.raw("GET", f"/drift/{name}/{version}/report", params=params).content)

    def ct_status(self, model: str | None = None) -> dict[str, Any]:
        """Continuous-training policies and the newest turns of the loop."""
        return dict(self.get("/ct", **({"model": model} if model else {})))

    def set_ct_policy(self, name: str, policy: dict[str, Any]) -> dict[str, Any]:
        """Create or replace the continuous-training policy of model `name`."""
        return dict(self.request("PUT", f"/ct/policies/{name}", json={"model_name": name, **policy}))

    def delete_ct_policy(self, name: str) -> None:
        """Remove the continuous-training policy of model `name`."""
        self.raw("DELETE", f"/ct/policies/{name}")

    def ct_decide(self, action_id: int, *, approve: bool, reason: str = "") -> dict[str, Any]:
        """Approve (start its federated run) or reject the step a turn of the loop waits for."""
        if approve:
            return dict(self.request("POST", f"/ct/actions/{action_id}/approve"))
        return dict(self.request("POST", f"/ct/actions/{action_id}/reject", json={"reason": reason}))

    def reference_profile(self, name: str, version: str) -> dict[str, Any]:
        """The reference profile pushed with `name:version`."""
        return dict(self.get(f"/models/{name}/versions/{version}/profile"))

    # -- model cards and approvals -----------------------------------------------------------------

    def model_card(self, name: str, version: str) -> dict[str, Any]:
        """The model card of `name:version` with its digest, risk class and signing state."""
        return dict(self.get(f"/models/{name}/versions/{version}/card"))

    def set_model_card(self, name: str, version: str, card: dict[str, Any]) -> dict[str, Any]:
        """Set the model card of `name:version` (it carries the version's risk class)."""
        return dict(self.put_json(f"/models/{name}/versions/{version}/card", card))

    def version_approvals(self, name: str, version: str) -> dict[str, Any]:
        """The approval status of `name:version`: approvals needed, who signed, who could, deployable or why not."""
        return dict(self.get(f"/models/{name}/versions/{version}/approvals"))

    def approvals(self) -> list[dict[str, Any]]:
        """Every high-risk version not signed yet, with its approval status."""
        return list(self.get("/approvals")["data"])

    # -- devices and deployments -------------------------------------------------------------------

    def devices(self) -> list[dict[str, Any]]:
        """Every known device with its reported state."""
        return list(self.get("/devices")["data"])

    def device(self, device_id: str) -> dict[str, Any]:
        """One device with its reported state and telemetry totals."""
        return dict(self.get(f"/devices/{device_id}"))

    def telemetry(self, device_id: str) -> list[dict[str, Any]]:
        """The telemetry windows the coordinator stored for one device."""
        return list(self.get(f"/devices/{device_id}/telemetry")["data"])

    def device_events(self, device_id: str, *, limit: int = 200, after_id: int | None = None) -> list[dict[str, Any]]:
        """A device's events, oldest first: the newest `limit`, or the first `limit` after event `after_id`."""
        params: dict[str, Any] = {"limit": limit} | ({"after_id": after_id} if after_id is not None else {})
        return list(self.get(f"/devices/{device_id}/events", **params)["data"])

    def decommission_device(self, device_id: str) -> dict[str, Any]:
        """Revoke a device and take it out of the fleet for good (its history stays)."""
        return dict(self.post_json(f"/devices/{device_id}/decommission", {}))

    def deploy(
        self,
        *,
        model: str,
        version: str | None = None,
        tags: dict[str, str] | None = None,
        device_ids: list[str] | None = None,
    ) -> dict[str, Any]:
        """Deploy `model:version`, or `model@alias` (no version), to devices chosen by tags or ids."""
        target: dict[str, Any] = {"tags": tags} if tags else {"device_ids": device_ids or []}
        body: dict[str, Any] = {"model": model, "target": target} | ({"version": version} if version else {})
        return dict(self.post_json("/deployments", body))

    def deployments(self) -> list[dict[str, Any]]:
        """Deployments, newest first."""
        return list(self.get("/deployments")["data"])

    def deployment(self, deployment_id: str | int) -> dict[str, Any]:
        """One deployment with its per-device progress."""
        return dict(self.get(f"/deployments/{deployment_id}"))

    def fleet_summary(self) -> dict[str, Any]:
        """Per-device versions, inference counts and latency percentiles."""
        return dict(self.get("/fleet/summary"))

    # -- rollouts ----------------------------------------------------------------------------------

    def create_rollout(self, plan: dict[str, Any]) -> dict[str, Any]:
        """Create a rollout from a plan (the body `POST /rollouts` takes)."""
        return dict(self.post_json("/rollouts", plan))

    def rollouts(self) -> list[dict[str, Any]]:
        """Rollouts, newest first."""
        return list(self.get("/rollouts")["data"])

    def rollout(self, rollout_id: int, *, devices: bool = True) -> dict[str, Any]:
        """One rollout with its waves, gates, decisions and (unless `devices` is False: a status poll) devices."""
        if devices:
            return dict(self.get(f"/rollouts/{rollout_id}"))
        return dict(self.get(f"/rollouts/{rollout_id}", devices=0))

    def rollout_command(self, rollout_id: int, command: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send `pause`, `resume`, `abort` or `promote` to a rollout."""
        return dict(self.post_json(f"/rollouts/{rollout_id}/{command}", body or {}))

    # -- alerts ------------------------------------------------------------------------------------

    def alerts(
        self, *, state: str = "all", rule: str | None = None, model: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Alerts, newest first: of one state (open, acked, resolved, unresolved, all), rule and model."""
        params = {"state": state, "rule": rule, "model": model, "limit": limit}
        return list(self.get("/alerts", **{k: v for k, v in params.items() if v is not None})["data"])

    def alert(self, alert_id: int) -> dict[str, Any]:
        """One alert with its webhook deliveries."""
        return dict(self.get(f"/alerts/{alert_id}"))

    def ack_alert(self, alert_id: int, note: str | None = None) -> dict[str, Any]:
        """Acknowledge an open alert (it stays unresolved until its condition goes); the alert as it then is."""
        return dict(self.post_json(f"/alerts/{alert_id}/ack", {"note": note}))

    def alert_rules(self) -> dict[str, Any]:
        """The alert rules the coordinator evaluates (`data`), its tick, resolve_after and webhook count."""
        return dict(self.get("/alerts/rules"))

    def set_alert_rule(
        self, rule: str, *, model: str | None = None, enabled: bool | None = None, threshold: float | None = None
    ) -> dict[str, Any]:
        """Switch `rule` off or on and/or set its threshold for `model` (None: fleet-wide); the rules as they are."""
        params = {"model": model} if model else None
        body = {"enabled": enabled, "threshold": threshold}
        return dict(self.request("PUT", f"/alerts/rules/{rule}", params=params, json=body))

    def reset_alert_rule(self, rule: str, *, model: str | None = None) -> dict[str, Any]:
        """Remove `rule`'s override for `model` (None: the fleet-wide one); the rules as they then are."""
        params = {"model": model} if model else None
        return dict(self.request("DELETE", f"/alerts/rules/{rule}", params=params))

    # -- federated runs ----------------------------------------------------------------------------

    def create_federated_run(self, body: dict[str, Any]) -> dict[str, Any]:
        """Start a federated run (the body `POST /federated/runs` takes: model, selector, rounds, strategy, ...)."""
        return dict(self.post_json("/federated/runs", body))

    def federated_runs(self, **filters: Any) -> list[dict[str, Any]]:
        """Federated runs, newest first (`model=`, `status=`, `limit=` filter them)."""
        params = {k: v for k, v in filters.items() if v is not None}
        return list(self.get("/federated/runs", **params)["data"])

    def federated_run(self, run_id: int) -> dict[str, Any]:
        """One federated run: its cohort, parameters, rounds so far, candidate and error."""
        return dict(self.get(f"/federated/runs/{run_id}"))

    def stop_federated_run(self, run_id: int) -> dict[str, Any]:
        """Stop a federated run that has not finished."""
        return dict(self.post_json(f"/federated/runs/{run_id}/stop", {}))

    def report_federated_candidate(self, run_id: int, body: dict[str, Any]) -> dict[str, Any]:
        """Report what the candidate builder made of a run: `{candidate_version, rollout_id, error}`."""
        return dict(self.post_json(f"/federated/runs/{run_id}/candidate", body))


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict) and body.get("detail"):
        return str(body["detail"])
    return str(body)[:500]


# -- where the client finds the coordinator: the CLI configuration file ------------------------------


def config_path() -> Path:
    """`$EDGEFLEET_CONFIG`, else `$XDG_CONFIG_HOME/edgefleet/config.toml`, else `~/.config/edgefleet/config.toml`."""
    if explicit := os.environ.get("EDGEFLEET_CONFIG"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "edgefleet" / "config.toml"


@dataclass(frozen=True)
class CliConfig:
    """Where the coordinator is and how to authenticate to it."""

    url: str | None = None
    token: str | None = None


def read_config(path: Path | None = None) -> CliConfig:
    """The config file's values; an absent file is an empty config, an unreadable one says why."""
    path = path or config_path()
    if not path.exists():
        return CliConfig()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read CLI config {path}: {exc}") from exc
    url, token = data.get("url"), data.get("token")
    return CliConfig(url=str(url) if url else None, token=str(token) if token else None)


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config_if_absent(*, url: str, token: str, path: Path | None = None) -> Path | None:
    """Write url and token (mode 0600) unless the file exists; returns the path written, or None."""
    path = path or config_path()
    if path.exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    body = f"# written by `edgefleet up`\nurl = {_toml_string(url)}\ntoken = {_toml_string(token)}\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as fh:
        fh.write(body)
    return path


REPORT_FILE = "report.json"  # what `edgefleet compress` writes beside variants.json
TRAINABLE_FILE = "trainable.pt2"  # the trainable form `edgefleet compress` writes beside them (torch models)


def compression_report_field(directory: Path) -> dict[str, str]:
    """The compression report in `directory` as a push's `report` field (none when the directory has none).

    `ValueError` naming the file when it is not a JSON object.
    """
    path = directory / REPORT_FILE
    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
        if not isinstance(json.loads(text), dict):
            raise ValueError(f"{path}: a compression report is a JSON object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a compression report from `edgefleet compress` ({exc})") from exc
    return {"report": text}


def profile_field(source: Path) -> dict[str, str]:
    """A reference profile (a `reference_profile.json`, or a directory holding one) as a push's `profile` field;
    none when a directory has none. `ValueError` naming the file when it is not a JSON object."""
    path = source / PROFILE_FILE if source.is_dir() else source
    if source.is_dir() and not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
        if not isinstance(json.loads(text), dict):
            raise ValueError(f"{path}: a reference profile is a JSON object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{path}: not a reference profile from `edgefleet compress` or `edgefleet profile` ({exc})"
        ) from exc
    return {"profile": text}


def variant_fields(entry: ManifestVariant) -> dict[str, str]:
    """Form fields of one manifest entry for the registry's variant upload."""
    fields = {
        "variant": entry.name,
        "format": entry.format.value,
        "precision": entry.precision or "fp32",
        "cpu_features": json.dumps(entry.cpu_features),
    }
    if entry.runtime:
        fields["runtime"] = entry.runtime
    for key, value in (
        ("accuracy", entry.accuracy),
        ("agreement", entry.agreement),
        ("latency_p50_ms", entry.latency.p50_ms),
    ):
        if value is not None:
            fields[key] = str(value)
    for key, specs in (("inputs", entry.inputs), ("outputs", entry.outputs)):
        if specs:
            fields[key] = json.dumps([spec.model_dump(mode="json") for spec in specs])
    return fields
