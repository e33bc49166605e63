"""`Agent`: one device's daemon, wiring config, runtime, update worker, endpoint, telemetry and MQTT.

Many agents can run in one process (simulated fleets): nothing here is process-global, and each agent
has its own data directory, MQTT client, update worker and telemetry timer (plus an optional endpoint).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping
from importlib import metadata

import httpx
import numpy as np

from agent.capabilities import device_capabilities
from agent.config import AgentConfig
from agent.errors import ConfigError, TransportError
from agent.runtime import LoadedModel, RuntimeCatalog, default_catalog
from agent.server import InferenceServer, create_app
from agent.serving import Serving
from agent.telemetry import SeqCounter, TelemetryPublisher, TelemetryRecorder
from agent.transport import MqttTransport, Transport, client_id_for
from agent.update import (
    ArtifactFetcher,
    HealthPolicy,
    SlotStore,
    StateFile,
    UpdateExecutor,
    UpdateHooks,
    UpdateState,
    UpdateWorker,
    transition_event,
)
from protocol import (
    DEFAULT_BASE,
    Capabilities,
    DesiredState,
    DeviceEvent,
    DeviceStatus,
    ErrorCode,
    ErrorInfo,
    EventKind,
    MalformedMessageError,
    ModelRef,
    ReportedState,
    TelemetryWindow,
    Topics,
    UpdateStatus,
    decode,
    encode,
)
from protocol.errors import BrokerUrlError
from protocol.mqtt import BrokerAddress, parse_mqtt_url

__all__ = ["Agent", "agent_version", "health_policy", "resolve_broker"]

log = logging.getLogger(__name__)

MAX_SENT_SEQS = 10_000  # published telemetry seqs remembered for `telemetry_sent_seqs`


def agent_version() -> str:
    """The installed edgefleet version."""
    try:
        return metadata.version("edgefleet")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def resolve_broker(config: AgentConfig, timeout_s: float = 10.0) -> tuple[str, str]:
    """`(mqtt_url, topic_base)`: configured values, else the coordinator's `GET /api/v1/info`."""
    mqtt_url, base = config.mqtt_url, config.topic_base
    if mqtt_url is None or base is None:
        if config.coordinator_url is None:
            return str(mqtt_url), base or DEFAULT_BASE
        url = f"{config.coordinator_url}/api/v1/info"
        try:
            response = httpx.get(url, timeout=timeout_s)
            response.raise_for_status()
            info = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise TransportError(f"cannot fetch the broker address from {url}: {exc}") from exc
        if not isinstance(info, dict):
            raise TransportError(f"{url} did not answer a JSON object")
        mqtt_url = mqtt_url or info.get("mqtt_url")
        base = base or info.get("topic_base") or DEFAULT_BASE
        if not isinstance(mqtt_url, str) or not mqtt_url:
            raise TransportError(f"{url} names no mqtt_url; set mqtt_url in the agent configuration")
    return mqtt_url, str(base)


def health_policy(config: AgentConfig) -> HealthPolicy:
    """The update path's health settings of `config` (the fields of `HealthPolicy` are config keys)."""
    return HealthPolicy(**{f.name: getattr(config, f.name) for f in dataclasses.fields(HealthPolicy)})


class Agent:
    """One device: `Agent(config)` builds nothing yet; `start()` loads, serves and connects; `stop()` ends."""

    def __init__(
        self, config: AgentConfig, *, catalog: RuntimeCatalog | None = None, hooks: UpdateHooks | None = None
    ) -> None:
        self.config = config
        self._hooks = hooks
        self._catalog = catalog or default_catalog(config.intra_op_threads)
        if config.runtimes is not None:
            self._catalog = self._catalog.restricted_to(config.runtimes)
        self._recorder = TelemetryRecorder()
        self._serving = Serving(record=self._recorder.record)
        self._slots = SlotStore(config.data_dir / "slots")
        self._lock = threading.Lock()
        self._changed = threading.Condition()  # notified after every update transition
        self._rejected = 0
        self._sent_seqs: list[int] = []
        self._started = False
        self._topics: Topics | None = None
        self._transport: Transport | None = None
        self._worker: UpdateWorker | None = None
        self._fetcher: ArtifactFetcher | None = None
        self._telemetry: TelemetryPublisher | None = None
        self._server: InferenceServer | None = None
        self._capabilities: Capabilities | None = None

    # -- public API -------------------------------------------------------------------------------

    @property
    def active_model(self) -> ModelRef | None:
        """Identity of the model being served."""
        active = self._serving.current()
        return active.ref if active else None

    @property
    def loaded_model(self) -> LoadedModel | None:
        """The model being served (its `inputs`/`outputs` describe requests)."""
        active = self._serving.current()
        return active.model if active else None

    @property
    def update_status(self) -> UpdateStatus | None:
        """Progress towards the latest desired generation; None before any desired state."""
        return self._worker.state.status() if self._worker is not None else None

    @property
    def inference_url(self) -> str | None:
        """Base URL of the local inference endpoint, when it runs."""
        return self._server.url if self._server is not None else None

    @property
    def rejected_messages(self) -> int:
        """How many malformed messages this agent dropped."""
        return self._rejected

    @property
    def telemetry_sent_seqs(self) -> list[int]:
        """Seqs of the telemetry windows this agent published since it was created (the most recent 10,000)."""
        with self._lock:
            return list(self._sent_seqs)

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference on the served model, counted in telemetry; `NoModelError` before a model is loaded."""
        return self._serving.infer(inputs)

    def wait_for_model(self, version: str, timeout: float) -> bool:
        """Wait until the served model has `version` and its update is reported done; False after `timeout`."""

        def settled() -> bool:
            active = self._serving.current()
            if active is None or active.spec.version != version:
                return False
            state = self._worker.state if self._worker is not None else None
            if state is None or not state.in_progress or state.target is None:
                return True
            return state.target.version != version  # still switching to it: not done yet

        with self._changed:
            return self._changed.wait_for(settled, timeout)

    def flush_telemetry(self) -> None:
        """Publish the current telemetry window now (nothing when it is empty or the agent is not started)."""
        if self._telemetry is not None:
            self._telemetry.flush()

    def start(self) -> None:
        """Load the active slot, resume an interrupted update, start the endpoint and connect (non-blocking)."""
        if self._started:
            raise RuntimeError(f"agent {self.config.device_id} is already started")
        address, base = self._resolve_broker()
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self._topics = Topics(base)
        self._capabilities = self._detect_capabilities()  # once: /proc/cpuinfo does not change
        worker = self._build_update_path()
        worker.boot()
        try:
            self._start_endpoint()
            self._start_messaging(address, base)
            worker.start()
        except BaseException:
            self._shutdown(report=False)
            raise
        self._started = True
        self._event(EventKind.AGENT_STARTED, message=f"agent {agent_version()} started")
        log.info(
            "agent %s started (model: %s, endpoint: %s)", self.config.device_id, self.active_model, self.inference_url
        )

    def stop(self) -> None:
        """Flush telemetry, report offline, disconnect and stop the endpoint; safe to call twice."""
        if not self._started:
            return
        self._started = False
        self._shutdown(report=True)
        log.info("agent %s stopped", self.config.device_id)

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- start, one step each ----------------------------------------------------------------------

    def _resolve_broker(self) -> tuple[BrokerAddress, str]:
        """The broker's address and the topic base, from the configuration or the coordinator."""
        mqtt_url, base = resolve_broker(self.config, timeout_s=min(self.config.download_timeout_s, 10.0))
        try:
            return parse_mqtt_url(mqtt_url), base
        except BrokerUrlError as exc:
            raise ConfigError(f"mqtt_url: {exc}") from exc

    def _detect_capabilities(self) -> Capabilities:
        """What this device reports it can run: detected, then the configured overrides."""
        detected = device_capabilities(self._catalog)
        overrides = {"cpu_features": self.config.cpu_features, "memory_mb": self.config.memory_mb}
        return detected.model_copy(update={k: v for k, v in overrides.items() if v is not None})

    def _build_update_path(self) -> UpdateWorker:
        """The fetcher, the executor of update steps and the worker that drives them (not started yet)."""
        cfg = self.config
        self._fetcher = ArtifactFetcher(
            timeout_s=cfg.download_timeout_s,
            attempts=cfg.download_attempts,
            base_url=cfg.coordinator_url,
            sleep=lambda s: self._worker.sleep(s) if self._worker else False,
        )
        executor = UpdateExecutor(
            slots=self._slots,
            downloads=cfg.data_dir / "downloads",
            catalog=self._catalog,
            serving=self._serving,
            fetcher=self._fetcher,
            policy=health_policy(cfg),
        )
        self._worker = UpdateWorker(
            name=cfg.device_id,
            state_file=StateFile(cfg.data_dir / "update-state.json"),
            executor=executor,
            slots=self._slots,
            serving=self._serving,
            on_transition=self._on_transition,
            hooks=self._hooks,
            max_trial_boots=cfg.max_trial_boots,
        )
        return self._worker

    def _start_endpoint(self) -> None:
        """Serve the local inference endpoint, unless `http_port` disables it."""
        cfg = self.config
        if cfg.http_port is None:
            return
        self._server = InferenceServer(
            create_app(self._serving, version=agent_version()),
            host=cfg.http_host,
            port=cfg.http_port,
            name=cfg.device_id,
        )
        self._server.start()

    def _start_messaging(self, address: BrokerAddress, base: str) -> None:
        """Build the MQTT transport (with the offline last will) and the telemetry publisher, then start both."""
        cfg, topics = self.config, self._topics
        assert topics is not None, "set by start() before messaging starts"
        offline = ReportedState(device_id=cfg.device_id, status=DeviceStatus.OFFLINE, tags=cfg.tags)
        self._transport = MqttTransport(
            address=address,
            client_id=cfg.mqtt_client_id or client_id_for(cfg.device_id, base),
            subscriptions=[topics.desired(cfg.device_id)],
            will=(topics.reported(cfg.device_id), encode(offline)),
            reconnect_min_s=cfg.reconnect_min_s,
            reconnect_max_s=cfg.reconnect_max_s,
        )
        self._telemetry = TelemetryPublisher(
            device_id=cfg.device_id,
            recorder=self._recorder,
            seq=SeqCounter(cfg.data_dir / "telemetry-seq"),
            publish=self._publish_telemetry,
            interval_s=cfg.telemetry_interval_s,
        )
        self._transport.start(on_message=self._on_message, on_connect=self._on_connect)
        self._telemetry.start()

    # -- internals --------------------------------------------------------------------------------

    def _shutdown(self, *, report: bool) -> None:
        if self._worker is not None:
            self._worker.stop()
        if self._telemetry is not None:
            self._telemetry.stop()
            if report:
                try:
                    self._telemetry.flush()
                except Exception:
                    log.exception("final telemetry flush of %s failed", self.config.device_id)
        if self._transport is not None:
            if report:
                self._report(status=DeviceStatus.OFFLINE)
            self._transport.close(timeout=5.0)
        if self._server is not None:
            self._server.stop()
        if self._fetcher is not None:
            self._fetcher.close()
        self._transport = self._telemetry = self._server = self._fetcher = None

    def _on_connect(self) -> None:
        self._report()

    def _on_message(self, topic: str, payload: bytes) -> None:
        assert self._topics is not None
        if topic != self._topics.desired(self.config.device_id):
            return
        if not payload:
            log.info("desired state of %s was cleared (empty retained message); nothing to do", self.config.device_id)
            return
        try:
            desired = decode(DesiredState, payload)
        except MalformedMessageError as exc:
            self._reject(topic, str(exc))
            return
        if desired.device_id != self.config.device_id:
            self._reject(
                topic, f"desired state for device {desired.device_id!r} on the topic of {self.config.device_id!r}"
            )
            return
        assert self._worker is not None
        self._worker.submit(desired)

    def _reject(self, topic: str, reason: str) -> None:
        with self._lock:
            self._rejected += 1
        log.warning("rejected message on %s: %s", topic, reason)
        self._event(EventKind.MESSAGE_REJECTED, message=reason, error=ErrorInfo.of(ErrorCode.MALFORMED_MESSAGE, reason))

    def _on_transition(self, old: UpdateState, new: UpdateState) -> None:
        with self._changed:
            self._changed.notify_all()
        kind = transition_event(old, new)
        if kind is not None:
            target = f"{new.target.name}:{new.target.version}" if new.target else "nothing"
            self._event(
                kind, generation=new.generation, phase=new.phase, message=f"{new.phase.value} {target}", error=new.error
            )
        self._report()

    def _report(self, status: DeviceStatus = DeviceStatus.ONLINE) -> None:
        transport, topics = self._transport, self._topics
        if transport is None or topics is None:
            return
        state = ReportedState(
            device_id=self.config.device_id,
            status=status,
            active_model=self.active_model,
            update=self.update_status,
            tags=self.config.tags,
            agent_version=agent_version(),
            capabilities=self._capabilities,
            inference_url=self.inference_url,
        )
        transport.publish(topics.reported(self.config.device_id), encode(state), qos=1, retain=True)

    def _event(self, kind: EventKind, **fields: object) -> None:
        transport, topics = self._transport, self._topics
        if transport is None or topics is None:
            return
        event = DeviceEvent(device_id=self.config.device_id, kind=kind, **fields)
        transport.publish(topics.events(self.config.device_id), encode(event), qos=1)

    def _publish_telemetry(self, window: TelemetryWindow) -> None:
        transport, topics = self._transport, self._topics
        if transport is None or topics is None:
            raise TransportError("telemetry published before the transport started")
        transport.publish(topics.telemetry(self.config.device_id), encode(window), qos=1)
        with self._lock:
            self._sent_seqs.append(window.seq)
            del self._sent_seqs[:-MAX_SENT_SEQS]
