"""The agent's typed configuration: a TOML file, overridden by `EDGEFLEET_AGENT_*` environment variables.

Example (`edgefleet-agent init` prints a commented one)::

    device_id = "cam-0001"
    data_dir = "/var/lib/edgefleet-agent"
    coordinator_url = "http://coordinator:8000"   # the MQTT URL and topic base come from /api/v1/info
    [tags]
    site = "lab"
    [sample_rates]        # federated retraining (docs/federated.md): keep a fifth of the digits requests' inputs
    digits = 0.2

Every key can be overridden by `EDGEFLEET_AGENT_<KEY>` (e.g. `EDGEFLEET_AGENT_HTTP_PORT=disabled`,
`EDGEFLEET_AGENT_TAGS=site=lab,ring=canary`, `EDGEFLEET_AGENT_SAMPLE_RATES=digits=0.2`). Relative paths in a
file (`data_dir`, `superlink_root_certificates`, `flower_bin_dir`) are relative to that file.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import ConfigError
from agent.reporting import DEFAULT_REPORT_INTERVAL_S
from protocol import TopicError, Topics, validate_device_id

__all__ = ["ENV_PREFIX", "AgentConfig", "load_config", "split_host_port"]

ENV_PREFIX = "EDGEFLEET_AGENT_"
_DISABLED = {"", "none", "off", "disabled", "false", "no"}


class AgentConfig(BaseModel):
    """Settings of one agent; built directly (simulators, tests) or by `load_config` (the daemon)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device_id: str = Field(description="this device's id; it appears in MQTT topics")
    data_dir: Path = Field(description="where slots, downloads, update state and telemetry seq live")
    coordinator_url: str | None = Field(default=None, description="base URL of the coordinator's HTTP API")
    mqtt_url: str | None = Field(
        default=None,
        description="mqtt://[user:pass@]host:port, or several separated by commas (a TOML list too): the agent fails "
        "over between them in turn; else from the coordinator",
    )
    mqtt_client_id: str | None = Field(default=None, description="MQTT client id; derived from device and base")
    topic_base: str | None = Field(default=None, description="topic base; else from the coordinator, else default")
    tags: dict[str, str] = Field(default_factory=dict, description="labels used for deployment targeting")
    http_host: str = Field(default="127.0.0.1", description="address of the local inference endpoint")
    http_port: int | None = Field(default=8500, ge=0, le=65535, description="0 = ephemeral, None = no endpoint")
    http_max_request_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, le=2**32, description="larger request bodies get 413 before they are read"
    )
    http_token: str | None = Field(
        default=None,
        min_length=16,
        description="bearer token required on every endpoint route but health; set it when http_host is not loopback",
    )
    metrics: bool = Field(default=True, description="serve Prometheus metrics at GET /metrics on the endpoint")
    telemetry_interval_s: float = Field(default=10.0, gt=0, le=86400)
    telemetry_outbox_windows: int = Field(
        default=10_000,
        ge=0,
        le=10_000_000,
        description="unconfirmed telemetry windows kept on disk (the oldest are dropped beyond); 0 = no outbox",
    )
    telemetry_outbox_bytes: int = Field(
        default=64 * 1024 * 1024, ge=64 * 1024, description="most bytes of unconfirmed telemetry kept on disk"
    )
    telemetry_resend_s: float = Field(
        default=30.0, gt=0, le=86400, description="seconds an unconfirmed telemetry window waits before it is resent"
    )
    telemetry_sketch_rate: float = Field(
        default=0.125,
        gt=0,
        le=1,
        description="share of inference calls whose input rows and confidence are sketched for drift (each call drawn "
        "at random; 1 = every call); counts, latencies and classes always cover every call",
    )
    report_interval_s: float = Field(
        default=DEFAULT_REPORT_INTERVAL_S,
        ge=0,
        le=60,
        description="seconds a change in the middle of an update waits before the retained reported state is sent "
        "(with the state of that moment: at most one report per interval; each phase still sends its event, and the "
        "end of an update, connects and stops go out at once); 0 = every change at once",
    )
    reconnect_min_s: float = Field(default=1.0, gt=0, le=3600)
    reconnect_max_s: float = Field(default=60.0, gt=0, le=3600)
    broker_rediscover_after: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="failed broker connects in a row before an enrolled agent asks the coordinator where it is now",
    )
    download_timeout_s: float = Field(default=60.0, gt=0, le=86400, description="per-request network timeout")
    download_attempts: int = Field(default=3, ge=1, le=20, description="tries before a download is reported failed")
    download_min_rate_bps: int = Field(
        default=16384,
        ge=1,
        description="slowest accepted transfer (bytes/s): an attempt may take download_timeout_s + size/rate",
    )
    intra_op_threads: int = Field(default=1, ge=1, le=256, description="runtime threads per inference")
    # What the device offers the coordinator's variant policy (docs/variants.md). Detected unless set.
    runtimes: list[str] | None = Field(
        default=None, description="use only these installed runtimes (onnxruntime, litert); default: all installed"
    )
    cpu_features: list[str] | None = Field(
        default=None, description="report these CPU flags instead of /proc/cpuinfo's (pins the variant a device gets)"
    )
    memory_mb: int | None = Field(default=None, ge=1, description="report this much memory (MB) instead of the RAM")
    # Update safety: the shadow run before the switch, and the trial after it (see docs/architecture.md).
    shadow_inferences: int = Field(
        default=0, ge=0, le=100_000, description="live requests the candidate shadows before the switch; 0 = off"
    )
    shadow_max_disagreement: float = Field(
        default=0.05, ge=0, le=1, description="largest share of shadowed rows whose argmax may differ"
    )
    shadow_max_abs_diff: float | None = Field(
        default=None, ge=0, description="largest allowed |candidate - serving| output difference; None = unchecked"
    )
    shadow_max_latency_ratio: float | None = Field(
        default=None, gt=0, description="how many times slower (median) the candidate may be; None = unchecked"
    )
    shadow_timeout_s: float = Field(
        default=300.0, gt=0, le=86400, description="how long a shadow run waits for live requests"
    )
    shadow_on_timeout: Literal["pass", "fail"] = Field(
        default="pass", description="verdict of a shadow run that saw too few requests before shadow_timeout_s"
    )
    commit_after_s: float = Field(
        default=5.0, ge=0, le=86400, description="seconds a switched model serves on trial before it is committed"
    )
    commit_after_inferences: int = Field(
        default=0, ge=0, description="commit earlier, after this many successful inferences on trial; 0 = time only"
    )
    max_trial_boots: int = Field(
        default=3, ge=1, le=100, description="agent starts tolerated during a trial before rolling back"
    )
    certificate_check_s: float = Field(
        default=6 * 3600,
        gt=0,
        le=86400,
        description="how often a running agent checks whether to renew its certificate",
    )
    # Labels fed back for earlier predictions (docs/drift.md, "Labels fed back"): how many it remembers, how long.
    feedback_max_ids: int = Field(
        default=10_000, ge=1, le=10_000_000, description="predictions of requests with an id remembered for labels"
    )
    feedback_max_age_s: float = Field(
        default=3600.0, gt=0, le=30 * 86400.0, description="seconds a prediction waits for its label at most"
    )
    # Federated retraining (docs/federated.md): the local sample store and the Flower SuperNode.
    sample_rates: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict,
        description="model name -> share (0..1) of its served requests whose inputs are kept for retraining",
    )
    sample_store_max: int = Field(
        default=5000, ge=1, le=10_000_000, description="sample rows kept per model; the oldest are dropped beyond"
    )
    federated: bool = Field(default=False, description="run a Flower SuperNode that joins the fleet's SuperLink")
    superlink: str | None = Field(
        default=None, description="the SuperLink's host:port; default: asked from the coordinator"
    )
    superlink_root_certificates: Path | None = Field(
        default=None, description="PEM of the CA that signed the SuperLink's certificate (with superlink)"
    )
    flower_bin_dir: Path | None = Field(
        default=None,
        description="directory of flower-supernode; default: EDGEFLEET_FLOWER_BIN_DIR, ../.venv-flower/bin, PATH",
    )

    @field_validator("device_id")
    @classmethod
    def _valid_device_id(cls, value: str) -> str:
        try:
            return validate_device_id(value)
        except TopicError as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("topic_base")
    @classmethod
    def _valid_topic_base(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                Topics(value)
            except TopicError as exc:
                raise ValueError(str(exc)) from exc
        return value

    @field_validator("coordinator_url")
    @classmethod
    def _valid_url(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError(f"{value!r} is not a URL (expected scheme://host:port)")
        return value.rstrip("/") if value else value

    @field_validator("mqtt_url", mode="before")
    @classmethod
    def _valid_mqtt_urls(cls, value: Any) -> Any:
        """One URL or a list (a TOML array, or commas in a string), kept as one comma-separated string."""
        if value is None or not isinstance(value, str | list):
            return value
        urls = [str(url).strip() for url in (value.split(",") if isinstance(value, str) else value)]
        for url in urls:
            if "://" not in url:
                raise ValueError(f"{url!r} is not a URL (expected scheme://host:port, several separated by commas)")
        return ",".join(url.rstrip("/") for url in urls)

    @field_validator("superlink")
    @classmethod
    def _valid_superlink(cls, value: str | None) -> str | None:
        if value is not None:
            split_host_port(value)
        return value

    @field_validator("sample_rates")
    @classmethod
    def _named_models(cls, value: dict[str, float]) -> dict[str, float]:
        if any(not name.strip() for name in value):
            raise ValueError("model names in sample_rates must not be empty")
        return value

    @field_validator("http_port", mode="before")
    @classmethod
    def _port_or_disabled(cls, value: Any) -> Any:
        if value is None or value is False or (isinstance(value, str) and value.strip().lower() in _DISABLED):
            return None
        return value

    @model_validator(mode="after")
    def _reachable(self) -> AgentConfig:
        if self.coordinator_url is None and self.mqtt_url is None:
            raise ValueError("set coordinator_url (the device enrols with it and learns its broker), or mqtt_url")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(f"reconnect_max_s ({self.reconnect_max_s}) is below reconnect_min_s")
        if (self.superlink is None) != (self.superlink_root_certificates is None):
            raise ValueError(
                "set superlink and superlink_root_certificates together (the SuperLink's host:port and the PEM of "
                "the CA that signed its certificate), or neither to ask the coordinator"
            )
        return self


def split_host_port(address: str) -> tuple[str, int]:
    """`(host, port)` of `host:port` or `[v6]:port`; `ValueError` naming the expected form."""
    host, sep, port = address.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or "/" in address or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port (e.g. superlink.example:9092, without a scheme)")
    return host, int(port)


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Read `path` (TOML, optional) and apply `EDGEFLEET_AGENT_*` overrides from `env` (default: os.environ)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    source = "environment"
    if path is not None:
        source = str(path)
        values = _read_toml(path)
        for key in _PATH_KEYS:  # relative paths in a file are relative to that file
            if isinstance(values.get(key), str) and not Path(values[key]).is_absolute():
                values[key] = str((path.parent / values[key]).resolve())
    from_env = _env_overrides(env)
    values.update(from_env)
    try:
        return AgentConfig(**values)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source, set(from_env))) from exc


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file ({exc.strerror or exc})") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc


_LIST_KEYS = frozenset({"runtimes", "cpu_features"})
_MAPPING_KEYS = frozenset({"tags", "sample_rates"})
_PATH_KEYS = ("data_dir", "superlink_root_certificates", "flower_bin_dir")


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    known = set(AgentConfig.model_fields)
    found: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in known:
            raise ConfigError(f"environment {name}: unknown setting {key!r} (known: {', '.join(sorted(known))})")
        if key in _MAPPING_KEYS:  # e.g. EDGEFLEET_AGENT_SAMPLE_RATES=digits=0.5,cam=1
            found[key] = _parse_tags(name, raw)
        elif key in _LIST_KEYS:  # comma-separated, e.g. EDGEFLEET_AGENT_RUNTIMES=litert
            found[key] = [item.strip() for item in raw.split(",") if item.strip()]
        else:
            found[key] = raw
    return found


def _parse_tags(name: str, raw: str) -> dict[str, str]:
    """Tags (or sample rates) from the environment: a JSON object or `k=v,k2=v2`."""
    raw = raw.strip()
    if raw.startswith("{"):
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"environment {name}: not a JSON object ({exc})") from exc
        if not isinstance(parsed, dict):
            raise ConfigError(f"environment {name}: expected a JSON object of strings")
        return {str(k): str(v) for k, v in parsed.items()}
    tags: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"environment {name}: {item!r} is not key=value")
        tags[key.strip()] = value.strip()
    return tags


def _explain(exc: ValidationError, source: str, env_keys: set[str]) -> str:
    """One line per problem, naming the key and where its value came from."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<config>"
        origin = f"environment {ENV_PREFIX}{key.split('.')[0].upper()}" if key.split(".")[0] in env_keys else source
        reason = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            reason = f"unknown key (known: {', '.join(sorted(AgentConfig.model_fields))})"
        lines.append(f"{origin}: key {key!r}: {reason}")
    return "invalid agent configuration:\n  " + "\n  ".join(lines)
