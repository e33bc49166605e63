"""A fleet of real agents in one process: the real `agent.Agent`, one identity and data directory each.

Used by the demo, the end-to-end tests, benchmarks and fault injection. Nothing is faked: every
agent has its own MQTT connection, its own slots on disk, its own runtime session and (optionally)
its own local inference endpoint. With an operator's API token the fleet enrols itself the way an
operator and a device would: a one-time enrolment token per device (carrying the device's tags) from the
coordinator's API, then `agent.identity.enrol` with a key made on the "device".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent import Agent, AgentConfig
from agent.identity import enrol, load_identity
from cloud.client import ApiClient

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class DeviceProfile:
    """A kind of device in a mixed fleet: what it reports to the variant policy (None: detected)."""

    name: str
    runtimes: tuple[str, ...] | None = None
    cpu_features: tuple[str, ...] | None = None
    memory_mb: int | None = None


# Device kinds of the demo's mixed fleet, and what docs/variants.md's policy gives each.
MIXED_PROFILES = (
    DeviceProfile("x86-vnni-gateway", ("onnxruntime", "litert"), ("avx2", "avx512_vnni")),  # fastest int8
    DeviceProfile("x86-onnx-box", ("onnxruntime",), ("avx2", "avx512_vnni")),  # int8 ONNX
    DeviceProfile("x86-legacy", ("onnxruntime",), ("avx2",)),  # no VNNI: fp32
    DeviceProfile("arm-tflite-board", ("litert",), ("asimd", "asimddp")),  # TFLite only: tflite-int8
    DeviceProfile("tiny-sensor", ("onnxruntime",), ("avx2",), 256),  # little memory: smallest ONNX
)


@dataclass(frozen=True)
class FleetConfig:
    """How to build a simulated fleet."""

    devices: int
    data_root: Path
    coordinator_url: str | None = None
    mqtt_url: str | None = None
    topic_base: str | None = None
    id_prefix: str = "sim"
    tags: Mapping[str, str] = field(default_factory=dict)
    canary_fraction: float = 0.1
    http: bool = True
    telemetry_interval_s: float = 5.0
    # Device kinds assigned round-robin (tag `profile`); empty: every device reports what it detects.
    profiles: tuple[DeviceProfile, ...] = ()
    # This process runs devices first_index .. first_index + devices - 1 of a fleet of `fleet_size` (a fleet
    # split over processes; see `simulators.cli`). Defaults: the whole fleet in this process.
    first_index: int = 0
    fleet_size: int | None = None
    # An operator (or admin) API token: devices without an identity are enrolled with it before they start.
    api_token: str | None = None
    # Federated retraining: each device runs a Flower SuperNode (from `flower_bin_dir`, default the Flower venv
    # beside this one) joined to the coordinator's SuperLink, and keeps the inputs of these models' served requests.
    federated: bool = False
    flower_bin_dir: Path | None = None
    sample_rates: Mapping[str, float] = field(default_factory=dict)
    # Share of calls whose inputs and confidence are sketched for drift (the agent's `telemetry_sketch_rate`);
    # None: the agent's default. 1.0 makes every request count toward the coordinator's `drift_min_rows`.
    sketch_rate: float | None = None

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError(f"a fleet needs at least one device, got {self.devices}")
        if self.coordinator_url is None and self.mqtt_url is None:
            raise ValueError("a fleet needs a coordinator URL or an MQTT URL")


def device_id(config: FleetConfig, index: int) -> str:
    """The id of the fleet's `index`-th device (zero padded so they sort)."""
    return f"{config.id_prefix}-{index:04d}"


def device_tags(config: FleetConfig, index: int) -> dict[str, str]:
    """Tags of one simulated device: the fleet's own, a ring (canary/main) and a site."""
    canaries = max(1, round((config.fleet_size or config.devices) * config.canary_fraction))
    tags = {"fleet": config.id_prefix, "ring": "canary" if index < canaries else "main", "site": f"site-{index % 3}"}
    if config.profiles:
        tags["profile"] = device_profile(config, index).name
    tags.update(config.tags)
    return tags


def device_profile(config: FleetConfig, index: int) -> DeviceProfile:
    """The profile of the fleet's `index`-th device (round-robin over `config.profiles`)."""
    return config.profiles[index % len(config.profiles)] if config.profiles else DeviceProfile("detected")


def agent_config(config: FleetConfig, index: int) -> AgentConfig:
    """The configuration of one simulated device."""
    ident = device_id(config, index)
    extra: dict[str, object] = {}
    if config.topic_base is not None:
        extra["topic_base"] = config.topic_base
    profile = device_profile(config, index)
    if profile.runtimes is not None:
        extra["runtimes"] = list(profile.runtimes)
    if profile.cpu_features is not None:
        extra["cpu_features"] = list(profile.cpu_features)
    if profile.memory_mb is not None:
        extra["memory_mb"] = profile.memory_mb
    if config.sketch_rate is not None:
        extra["telemetry_sketch_rate"] = config.sketch_rate
    return AgentConfig(
        device_id=ident,
        data_dir=config.data_root / ident,
        coordinator_url=config.coordinator_url,
        mqtt_url=config.mqtt_url,
        tags=device_tags(config, index),
        http_port=0 if config.http else None,
        telemetry_interval_s=config.telemetry_interval_s,
        federated=config.federated,
        flower_bin_dir=config.flower_bin_dir,
        sample_rates=dict(config.sample_rates),
        **extra,
    )


class SimulatedFleet:
    """N real agents started and stopped together."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.agents: list[Agent] = [Agent(agent_config(config, i)) for i in self._indexes]

    @property
    def _indexes(self) -> range:
        return range(self.config.first_index, self.config.first_index + self.config.devices)

    def __enter__(self) -> SimulatedFleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def device_ids(self) -> list[str]:
        """Ids of every device of the fleet, in order."""
        return [device_id(self.config, i) for i in self._indexes]

    def enrol(self) -> None:
        """Enrol every device that has no identity yet (needs `api_token` and `coordinator_url`)."""
        config = self.config
        if config.api_token is None or config.coordinator_url is None:
            return
        client = ApiClient(config.coordinator_url, config.api_token)
        for index in self._indexes:
            ident = device_id(config, index)
            if load_identity(config.data_root / ident) is not None:
                continue
            body = {"tags": device_tags(config, index)}
            token = client.post_json(f"/devices/{ident}/enrolment-token", body)["token"]
            enrol(
                data_dir=config.data_root / ident, coordinator_url=config.coordinator_url, device_id=ident, token=token
            )

    def start(self, progress: ProgressFn | None = None) -> None:
        """Enrol the devices that need it, then start every agent; each loads its active slot and connects."""
        self.enrol()
        for done, agent in enumerate(self.agents, start=1):
            agent.start()
            if progress:
                progress(done, len(self.agents))

    def stop(self) -> None:
        """Stop every agent (flushing telemetry and reporting offline); errors of one do not stop the rest."""
        for agent in self.agents:
            try:
                agent.stop()
            except Exception:  # one broken agent must not leave the others running
                log.exception("stopping agent %s failed", agent.config.device_id)

    def running(self, version: str) -> list[Agent]:
        """Agents whose active model has `version`."""
        return [a for a in self.agents if a.active_model is not None and a.active_model.version == version]

    def wait_for_version(self, version: str, timeout: float, progress: ProgressFn | None = None) -> bool:
        """Wait until every agent serves `version`; False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            ready = len(self.running(version))
            if progress:
                progress(ready, len(self.agents))
            if ready == len(self.agents):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def flush_telemetry(self) -> None:
        """Publish every agent's current telemetry window now."""
        for agent in self.agents:
            agent.flush_telemetry()
