"""Typed settings of the coordinator, read from `EDGEFLEET_*` variables, an optional TOML/.env file, or code.

Nothing here opens a database or a socket: a `Settings` object is handed to `create_app(settings)` and the
factories it calls.
"""

from __future__ import annotations

import os
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from cloud.broker_rights import replica_identity, validate_replica_name
from cloud.errors import ConfigurationError
from cloud.leases import default_replica_name
from protocol.errors import BrokerUrlError, TopicError
from protocol.mqtt import parse_mqtt_urls
from protocol.topics import DEFAULT_BASE, Topics

__all__ = ["Environment", "Settings", "default_data_dir", "settings_error", "split_host_port"]

# Secrets that show up in examples and must never guard a production coordinator.
_PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "admin", "secret", "token", "password", "test"})
_MIN_PRODUCTION_TOKEN_CHARS = 24


def default_data_dir() -> Path:
    """`$EDGEFLEET_DATA_DIR`, else `$XDG_DATA_HOME/edgefleet`, else `~/.local/share/edgefleet`."""
    if explicit := os.environ.get("EDGEFLEET_DATA_DIR"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "edgefleet"


def settings_error(exc: Exception) -> str:
    """Why settings were refused, one line per field, without the values given: a rejected database or webhook URL
    may carry a password, and pydantic's own message repeats the input."""
    if not isinstance(exc, ValidationError):
        return str(exc)
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "settings"
        lines.append(f"{where}: {error['msg']}")
    return "; ".join(lines)


def split_host_port(address: str) -> tuple[str, int]:
    """`(host, port)` of `host:port` or `[v6]:port`; `ValueError` naming the expected form."""
    host, sep, port = address.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or "/" in address or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT (e.g. superlink.example:9092, without a scheme)")
    return host, int(port)


class Environment(StrEnum):
    """Development tolerates convenience defaults; production refuses them."""

    DEVELOPMENT = "development"
    PRODUCTION = "production"


class Settings(BaseSettings):
    """Everything the coordinator needs to start; see each field's description."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_", env_file=None, extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir, description="Database, artifacts and admin token.")
    database_url: str = Field(default="", description="SQLAlchemy URL; default SQLite in data_dir.")
    mqtt_url: str | None = Field(
        default=None,
        description="External broker, or several (the nodes of a cluster: comma-separated or a TOML list, tried "
        "round robin); None starts the embedded one.",
    )
    embedded_broker_host: str = "127.0.0.1"
    embedded_broker_port: int = Field(default=1883, ge=0, le=65535)
    topic_base: str = DEFAULT_BASE
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535, description="HTTP port; 0 picks a free one.")
    public_url: str | None = Field(default=None, description="URL devices use to fetch artifacts.")
    environment: Environment = Environment.DEVELOPMENT
    admin_token: str | None = Field(default=None, description="Overrides the generated data_dir/admin-token.")
    max_artifact_bytes: int = Field(default=2 * 1024**3, gt=0)
    artifact_base_url: str | None = Field(
        default=None,
        description=(
            "Object storage or a CDN holding the artifacts keyed by sha256 (e.g. https://cdn.example.com/fleet-"
            "artifacts): the artifact route still checks the caller, then answers 307 to <base>/<sha256>. Devices "
            "verify the sha256 (and TUF targets under governance), so the CDN cannot substitute bytes."
        ),
    )
    mqtt_client_id: str | None = Field(
        default=None, description="Bridge client id; default derived from the data dir and topic base."
    )
    pki_dir: Path | None = Field(
        default=None, description="The fleet CA, broker and coordinator certificates, CRL; default data_dir/pki."
    )
    broker_hostnames: list[str] = Field(
        default_factory=list, description="Extra names (DNS or IP) devices use for the embedded broker (TLS SANs)."
    )
    device_mqtt_url: str | None = Field(
        default=None,
        description="The broker URL(s) devices are told at enrolment (comma-separated or a TOML list); default the "
        "broker's own URL(s).",
    )
    mqtt_ca_file: Path | None = Field(
        default=None, description="CA that signed an external broker's server certificate; default the fleet CA."
    )
    root_keys_dir: Path | None = Field(
        default=None,
        description="Where a development coordinator keeps the root keys it makes (default <data_dir>.root-keys).",
    )
    broker_crl_file: Path | None = Field(
        default=None, description="A copy of the CRL an external broker reads (Mosquitto's crlfile), kept current."
    )
    broker_reload_command: str | None = Field(
        default=None, description="Shell command run after a revocation so the broker re-reads the CRL (SIGHUP)."
    )
    device_certificate_days: float = Field(default=90, gt=0, le=3650, description="Validity of device certificates.")
    enrolment_token_ttl_s: float = Field(
        default=24 * 3600, gt=0, le=90 * 24 * 3600, description="How long an enrolment token may be used."
    )
    max_json_body_bytes: int = Field(default=1024 * 1024, gt=0, description="Largest JSON request body accepted.")
    rollout_tick_s: float = Field(
        default=1.0, ge=0, le=3600, description="How often the rollout runner steps rollouts; 0 = no runner thread."
    )
    telemetry_gap_grace_s: float = Field(
        default=120.0,
        gt=0,
        le=7 * 86400,
        description="How long a hole in a device's telemetry chain waits for its windows (the agent resends them) "
        "before it is reported as a gap.",
    )
    governance_tick_s: float = Field(
        default=300.0,
        ge=0,
        le=86400,
        description="How often the coordinator re-signs repository metadata and director instructions before they "
        "expire; 0 = never (devices then refuse updates once the timestamp expires, after a day).",
    )
    approval_threshold: int = Field(
        default=2,
        ge=1,
        le=16,
        description="How many approvers (not revoked) must sign a high-risk model version before it may be deployed.",
    )
    federated: bool = Field(
        default=False,
        description="Federated learning: start and supervise a Flower SuperLink (or use superlink_url) and register "
        "every enrolled device's key with it (docs/federated.md).",
    )
    superlink_host: str | None = Field(
        default=None, description="Address the embedded SuperLink listens on; default the coordinator's `host`."
    )
    superlink_port: int = Field(
        default=9092,
        ge=0,
        le=65535,
        description="Port of the embedded SuperLink; 0 picks a free one on first start and keeps it "
        "(data_dir/federated/superlink.json) so devices keep finding it.",
    )
    superlink_url: str | None = Field(
        default=None,
        description="An external SuperLink (HOST:PORT) to use instead of starting one; it must run with "
        "--enable-supernode-auth and share the run result directories with the coordinator.",
    )
    superlink_ca_file: Path | None = Field(
        default=None, description="CA that signed an external SuperLink's certificate; default the fleet CA."
    )
    device_superlink_address: str | None = Field(
        default=None,
        description="The SuperLink HOST:PORT devices are told; default the host of the public URL and the "
        "SuperLink's port (or superlink_url).",
    )
    flower_bin_dir: Path | None = Field(
        default=None,
        description="Directory of the Flower venv's flower-superlink and flwr; default .venv-flower/bin beside the "
        "running venv, else the directory of flower-superlink on PATH.",
    )
    flower_node_tick_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="How often devices' SuperNode identities are reconciled with the SuperLink (registered, "
        "unregistered).",
    )
    alert_tick_s: float = Field(
        default=30.0, ge=0, le=86400, description="How often alert rules are evaluated (docs/alerts.md); 0 = never."
    )
    alert_window_s: float = Field(
        default=900.0,
        gt=0,
        le=7 * 86400,
        description="The telemetry windows of the last this many seconds are what error-rate and latency rules judge.",
    )
    alert_group_by: str = Field(
        default="device",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Cohorts of the telemetry and offline rules: `fleet`, `device`, or a tag key (one per value).",
    )
    alert_error_rate: float = Field(
        default=0.05, gt=0, le=1, description="Alert when a cohort's error rate (errors / inferences) is above this."
    )
    alert_min_inferences: int = Field(
        default=100, ge=1, le=10**9, description="A cohort's error rate and latency are judged on at least this many."
    )
    alert_latency_p95_ms: float = Field(
        default=500.0, gt=0, le=3_600_000, description="Alert when a cohort's p95 latency (ms) is above this."
    )
    alert_offline_after_s: float = Field(
        default=600.0,
        gt=0,
        le=30 * 86400,
        description="An enrolled device not online and not heard from for this long counts as offline.",
    )
    alert_rollout_stuck_s: float = Field(
        default=3600.0,
        gt=0,
        le=30 * 86400,
        description="Alert when a running rollout's state has not advanced for this long (and it waits for nothing "
        "it planned).",
    )
    ct_tick_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="How often continuous-training policies turn open drift alerts into federated runs and follow "
        "them; 0 = off.",
    )
    drift_window_s: float = Field(
        default=3600.0,
        ge=60,
        le=90 * 86400,
        description="Drift rules compare the sketches of the windows that ended in the last this many seconds with "
        "the version's reference profile.",
    )
    drift_group_by: str = Field(
        default="fleet",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Cohorts drift rules judge: `fleet`, `device`, or a device tag key (one cohort per value: "
        "site=b). Continuous-training policies add their own grouping for their model.",
    )
    drift_min_rows: int = Field(
        default=200, ge=10, le=10**9, description="A cohort's drift is judged on at least this many sketched rows."
    )
    drift_accuracy_drop: float = Field(
        default=0.05,
        gt=0,
        le=1,
        description="Alert when a cohort's estimated accuracy is this far (0.05 = 5 points) under the reference's.",
    )
    drift_min_labels: int = Field(
        default=50,
        ge=1,
        le=10**9,
        description="A cohort's labelled accuracy (labels local applications fed back) is reported and judged on at "
        "least this many labels in the drift window.",
    )
    drift_rollup_tick_s: float = Field(
        default=60.0,
        ge=0,
        le=86400,
        description="How often the windows received since the last compaction are merged into drift rollups (drift "
        "queries read rollups for whole buckets, raw windows for the rest); 0 = never.",
    )
    drift_rollup_bucket_s: int = Field(
        default=300,
        ge=10,
        le=86400,
        description="Length of the time buckets (by window end) drift rollups merge sketches over (changing it leaves "
        "existing rollups at their old length).",
    )
    drift_rollup_retention_days: float = Field(
        default=400,
        gt=0,
        le=36500,
        description="Drift rollups whose bucket is older than this are deleted.",
    )
    alert_resolve_after: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="An alert resolves once its condition has been absent for this many evaluations in a row.",
    )
    alert_webhook_urls: list[str] = Field(
        default_factory=list, description="Webhooks (http/https URLs) every alert event is POSTed to, signed."
    )
    alert_webhook_secret: str = Field(
        default="",
        description="The HMAC-SHA256 key of X-Edgefleet-Signature; refused empty or a placeholder outside development.",
    )
    alert_webhook_timeout_s: float = Field(default=10.0, gt=0, le=300, description="Timeout of one webhook POST.")
    alert_webhook_max_attempts: int = Field(
        default=8, ge=1, le=100, description="Attempts of one delivery before it is marked failed."
    )
    alert_webhook_backoff_s: float = Field(
        default=2.0, gt=0, le=3600, description="Wait before the 2nd attempt; doubled per attempt, with jitter."
    )
    alert_webhook_backoff_max_s: float = Field(
        default=600.0, gt=0, le=86400, description="The longest wait between two attempts of a delivery."
    )
    alert_delivery_poll_s: float = Field(
        default=1.0, gt=0, le=60, description="How often the webhook worker looks for deliveries that are due."
    )

    ingest_batch_max: int = Field(
        default=500,
        ge=1,
        le=10_000,
        description="Most telemetry windows the MQTT bridge stores in one transaction (1 = one by one).",
    )
    ingest_batch_wait_ms: float = Field(
        default=5.0,
        ge=0,
        le=1000,
        description="How long the bridge waits for more telemetry to fill a batch once one window is queued.",
    )
    ingest_processes: int = Field(
        default=1,
        ge=1,
        le=16,
        description="Processes storing telemetry (the coordinator's own plus N-1 started with it), sharing it through "
        "an MQTT shared subscription ($share): needs an external broker that supports them (Mosquitto 2, EMQX); "
        "the embedded one does not (docs/operations.md).",
    )
    rollup_bucket_s: int = Field(
        default=60,
        ge=1,
        le=86400,
        description="Length of the time buckets telemetry rollups sum windows over (by window start; changing it "
        "leaves existing rollups at their old length).",
    )
    telemetry_retention_days: float = Field(
        default=14,
        gt=0,
        le=3650,
        description="Raw telemetry windows older than this are deleted (their rollups are kept).",
    )
    rollup_retention_days: float = Field(
        default=400,
        gt=0,
        le=36500,
        description="Telemetry rollups whose bucket is older than this are deleted.",
    )
    retention_tick_s: float = Field(
        default=3600.0,
        ge=0,
        le=7 * 86400,
        description="How often old telemetry windows and rollups are deleted (in bounded batches); 0 = never.",
    )

    replicated: bool = Field(
        default=False,
        description="This coordinator is one of several replicas sharing one PostgreSQL database and one broker "
        "(docs/deployment.md): every inbound MQTT channel comes through shared subscriptions ($share/<group>/...) so "
        "each message is handled by one replica, each replica's bridge has a session of its own, and rollouts and "
        "periodic jobs are stepped by the replica holding their lease in the database. Needs an external broker "
        "with shared subscriptions (Mosquitto 2, EMQX) and PostgreSQL.",
    )
    replica: str = Field(
        default_factory=default_replica_name,
        description="This replica's name, unique among the running replicas: the holder of its leases and the name "
        "in its broker certificate (CN edgefleet:coordinator.<replica>, which the broker's ACL must list: "
        "`edgefleet broker mosquitto-config --replica`). Characters A-Z a-z 0-9 . _ -, at most 42 when replicated. "
        "Default <hostname>-<pid>, which changes at every start: give replicas stable names.",
    )
    lease_ttl_s: float = Field(
        default=5.0,
        ge=1,
        le=3600,
        description="How long a replica's lease on a rollout lasts unless renewed (every rollout tick): how soon "
        "another replica takes a rollout over after its holder dies. Periodic jobs hold theirs two ticks longer.",
    )

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("replica")
    @classmethod
    def _replica_name(cls, value: str) -> str:
        return validate_replica_name(value)

    @field_validator("topic_base")
    @classmethod
    def _valid_base(cls, value: str) -> str:
        try:
            Topics(value)
        except TopicError as exc:  # pydantic reports ValueErrors as validation errors naming the field
            raise ValueError(str(exc)) from exc
        return value

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if not value:
            return value
        try:
            url = make_url(value)
        except (ArgumentError, ValueError) as exc:
            # Unparsable, so SQLAlchemy cannot hide its password: everything up to the last "@" goes.
            shown = f"***@{value.rpartition('@')[2]}" if "@" in value else value
            raise ValueError(
                f"cannot use database URL {shown!r} ({exc}); expected sqlite:///PATH or "
                "postgresql+psycopg://USER@HOST:PORT/DATABASE"
            ) from None
        try:
            url.get_dialect()
        except (ArgumentError, NoSuchModuleError, ImportError) as exc:
            shown = url.render_as_string(hide_password=True)
            raise ValueError(
                f"cannot use database URL {shown!r} ({exc}); expected sqlite:///PATH or "
                "postgresql+psycopg://USER@HOST:PORT/DATABASE"
            ) from exc
        return value

    @field_validator("mqtt_url", "device_mqtt_url", mode="before")
    @classmethod
    def _broker_urls(cls, value: Any) -> Any:
        """One broker URL or several (a TOML list, or commas in a string), kept as one comma-separated string; the
        agent's rules (`parse_mqtt_urls`: MQTT schemes only, no mix of TLS and plain)."""
        if value is None or not isinstance(value, str | list):
            return value
        urls = [str(url).strip().rstrip("/") for url in (value.split(",") if isinstance(value, str) else value)]
        joined = ",".join(url for url in urls if url)
        try:
            parse_mqtt_urls(joined)
        except BrokerUrlError as exc:
            raise ValueError(str(exc)) from exc
        return joined

    @field_validator("superlink_url", "device_superlink_address")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            split_host_port(value)
        return value

    @field_validator("alert_webhook_urls")
    @classmethod
    def _webhook_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            parts = urlsplit(url)
            if parts.scheme not in {"http", "https"} or not parts.hostname:
                shown = parts._replace(netloc=parts.hostname or "").geturl() if parts.password else url
                raise ValueError(f"webhook URL {shown!r} is not an http:// or https:// URL with a host")
        return value

    @field_validator("public_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @field_validator("artifact_base_url")
    @classmethod
    def _artifact_base_is_http(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"artifact_base_url {value!r} is not an http:// or https:// URL with a host and no query")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _shared_ingest_needs_external_broker(self) -> Settings:
        if self.ingest_processes > 1 and self.mqtt_url is None:
            raise ValueError(
                f"ingest_processes={self.ingest_processes} needs an external broker with shared subscriptions "
                "(mqtt_url: Mosquitto 2, EMQX): the embedded broker accepts `$share/...` subscriptions but delivers "
                "nothing to them; use ingest_processes=1 with it"
            )
        return self

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        if not self.database_url:
            # Written past __setattr__ so that the derived value does not count as explicitly set, and
            # `load()` can still let a data_dir from a later source decide it.
            self.__dict__["database_url"] = f"sqlite:///{self.data_dir / 'edgefleet.db'}"
        return self

    @model_validator(mode="after")
    def _replicas_share_a_database_and_a_broker(self) -> Settings:
        if not self.replicated:
            return self
        if self.mqtt_url is None:
            raise ValueError("replicated needs an external broker (mqtt_url) with shared subscriptions")
        if not self.database_url.startswith("postgresql"):
            raise ValueError("replicated needs PostgreSQL (database_url): replicas cannot share a SQLite file")
        if self.ingest_processes > 1:
            raise ValueError("replicated takes ingest_processes=1: the replicas themselves share the telemetry")
        replica_identity(self.replica)  # the name must fit its broker certificate's CN
        return self

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> Settings:
        """Settings from a TOML or .env file (if given), then `EDGEFLEET_*` variables, then `overrides`.

        Explicit overrides win over the environment, which wins over the file.
        """
        file_values: dict[str, Any] = {}
        if path is not None:
            if path.suffix == ".toml":
                try:
                    file_values = dict(tomllib.loads(path.read_text()))
                except (OSError, tomllib.TOMLDecodeError) as exc:
                    raise ConfigurationError(f"cannot read settings file {path}: {exc}") from exc
                file_values = dict(file_values.get("coordinator", file_values))
            else:
                env_settings = cls(_env_file=path)
                file_values = env_settings.model_dump(exclude_unset=True)
        env_values = cls().model_dump(exclude_unset=True)
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls.model_validate({**file_values, **env_values, **given})

    @property
    def resolved_pki_dir(self) -> Path:
        """`pki_dir`, else `data_dir/pki`."""
        return (self.pki_dir or self.data_dir / "pki").expanduser()

    @property
    def topics(self) -> Topics:
        """The topic scheme under `topic_base`."""
        return Topics(self.topic_base)

    def resolved_public_url(self, bound_port: int | None = None) -> str:
        """`public_url`, else `http://host:port` from the host and the port actually bound."""
        if self.public_url:
            return self.public_url
        host = "127.0.0.1" if self.host in {"0.0.0.0", "::", ""} else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{bound_port if bound_port is not None else self.port}"

    @property
    def resolved_superlink_host(self) -> str:
        """`superlink_host`, else the coordinator's `host`."""
        return self.superlink_host or self.host

    def public_host(self) -> str:
        """The host devices reach the coordinator at (the public URL's, else `host`; loopback for a wildcard)."""
        return urlsplit(self.resolved_public_url()).hostname or "127.0.0.1"

    def check_production_ready(self) -> None:
        """Raise `ConfigurationError` for settings that must not reach production."""
        if self.environment is not Environment.PRODUCTION:
            return
        if self.admin_token is not None and (
            self.admin_token.strip().lower() in _PLACEHOLDER_SECRETS
            or len(self.admin_token.strip()) < _MIN_PRODUCTION_TOKEN_CHARS
        ):
            raise ConfigurationError(
                "EDGEFLEET_ADMIN_TOKEN is empty, a placeholder or shorter than "
                f"{_MIN_PRODUCTION_TOKEN_CHARS} characters; refusing to start in production "
                "(unset it to use the generated data_dir/admin-token)"
            )
        if self.alert_webhook_urls and (
            self.alert_webhook_secret.strip().lower() in _PLACEHOLDER_SECRETS
            or len(self.alert_webhook_secret.strip()) < _MIN_PRODUCTION_TOKEN_CHARS
        ):
            raise ConfigurationError(
                "EDGEFLEET_ALERT_WEBHOOK_SECRET is empty, a placeholder or shorter than "
                f"{_MIN_PRODUCTION_TOKEN_CHARS} characters while alert webhooks are configured; refusing to start "
                "in production (receivers could not tell the coordinator's alerts from forged ones)"
            )
