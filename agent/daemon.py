"""`Agent`: one device's daemon, wiring config, runtime, update worker, endpoint, telemetry and MQTT.

Many agents can run in one process (simulated fleets): nothing here is process-global, and each agent
has its own data directory, MQTT client, update worker and telemetry timer (plus an optional endpoint,
sample store and Flower SuperNode for federated retraining).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from agent.capabilities import device_capabilities
from agent.config import AgentConfig
from agent.credentials import Credentials
from agent.errors import ConfigError, NoModelError, TransportError
from agent.feedback import Feedback, FeedbackResult, PredictionLog, parse_feedback
from agent.metrics import AgentMetrics, AgentReading
from agent.outbox import Outbox
from agent.reporting import ReportCoalescer, must_flush
from agent.runtime import LoadedModel, RuntimeCatalog, default_catalog
from agent.seq import SEQ_FILE, SeqCounter
from agent.server import InferenceServer, create_app
from agent.serving import Serving
from agent.telemetry import TelemetryPublisher, TelemetryRecorder
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
    TelemetryAck,
    TelemetryWindow,
    Topics,
    UpdateStatus,
    decode,
    encode,
)
from protocol.mqtt import BrokerAddress

if TYPE_CHECKING:
    from agent.federation import FederationInfo, FederationStatus, SupernodeSupervisor
    from agent.samples import SampleStats, SampleStore

# Imported where they are first needed, so an idle agent with an ONNX model never loads them: `agent.federation`
# (federated = true), `agent.trust` (tuf, for a device enrolled with the fleet's TUF root), `agent.samples`
# (sqlite3, when a model is in sample_rates); `agent.identity` loads cryptography only for an enrolled device.

__all__ = ["Agent", "agent_version", "health_policy"]

log = logging.getLogger(__name__)

MAX_SENT_SEQS = 10_000  # published telemetry seqs remembered for `telemetry_sent_seqs`


def agent_version() -> str:
    """The installed edgefleet version."""
    try:
        return metadata.version("edgefleet")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _sample_store(config: AgentConfig) -> SampleStore | None:
    """The local sample store when a model is in `sample_rates` (federated retraining), else None."""
    if not config.sample_rates:
        return None
    from agent.samples import SampleStore, sample_store_path

    return SampleStore(sample_store_path(config.data_dir), rates=config.sample_rates, max_rows=config.sample_store_max)


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
        self._recorder = TelemetryRecorder(sketch_rate=config.telemetry_sketch_rate)
        self._serving = Serving(record=self._recorder.record)
        # Inference counts come from the recorder at scrape time: no per-call work for metrics.
        self._metrics = AgentMetrics(self._metrics_reading, self._recorder.served) if config.metrics else None
        self._slots = SlotStore(config.data_dir / "slots")
        self._lock = threading.Lock()
        self._changed = threading.Condition()  # notified after every update transition
        self._rejected = 0
        self._sent_seqs: list[int] = []
        self._started = False
        self._topics: Topics | None = None
        self._transport: Transport | None = None
        self._reports: ReportCoalescer | None = None  # the retained reported state's publisher
        self._worker: UpdateWorker | None = None
        self._fetcher: ArtifactFetcher | None = None
        self._telemetry: TelemetryPublisher | None = None
        self._server: InferenceServer | None = None
        self._capabilities: Capabilities | None = None
        self._credentials = Credentials(config)
        self._samples = _sample_store(config)
        self._feedback = Feedback(
            PredictionLog(max_ids=config.feedback_max_ids, max_age_s=config.feedback_max_age_s),
            current=self._serving.current,
            add_labels=self._recorder.add_labels,
            observe=self._metrics.labels if self._metrics is not None else None,
            forward=self._store_labels,
        )
        self._federation: SupernodeSupervisor | None = None
        self._refused: tuple[int, ErrorInfo] | None = None
        self._brokers: tuple[BrokerAddress, ...] | None = None  # the brokers at the last connect (moved: others)

    # -- public API -------------------------------------------------------------------------------

    @property
    def broker_address(self) -> BrokerAddress | None:
        """Where the agent's MQTT connection goes now (after a moved broker was found: the new address)."""
        transport = self._transport
        return transport.address if isinstance(transport, MqttTransport) else None

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
        """Seqs of the telemetry windows this agent published since it was created (the most recent 10,000).

        First publishes only: windows sent again from the outbox are not listed twice.
        """
        with self._lock:
            return list(self._sent_seqs)

    @property
    def telemetry_unconfirmed(self) -> list[int]:
        """Seqs of the telemetry windows on disk that the coordinator has not confirmed yet (none when stopped)."""
        telemetry = self._telemetry
        return telemetry.unconfirmed if telemetry is not None else []

    @property
    def telemetry_dropped(self) -> int:
        """Telemetry windows this device dropped for good (its outbox was full); 0 when stopped."""
        telemetry = self._telemetry
        return telemetry.dropped if telemetry is not None else 0

    @property
    def sample_stats(self) -> SampleStats | None:
        """Counters of the local sample store (None when no model is in `sample_rates`)."""
        return self._samples.stats() if self._samples is not None else None

    @property
    def federation_status(self) -> FederationStatus:
        """What the device's Flower SuperNode is doing (state `disabled` unless `federated`)."""
        federation = self._federation
        if federation is not None:
            return federation.status
        from agent._federation_status import FederationStatus  # not agent.federation: never loaded unless federated

        return FederationStatus(state="disabled")

    def infer(self, inputs: Mapping[str, np.ndarray], *, request_id: str | None = None) -> dict[str, np.ndarray]:
        """Run one inference on the served model, counted in telemetry; `NoModelError` before a model is loaded.

        With a `request_id`, its prediction is remembered so that `feedback(request_id, label)` can label it.
        """
        if not request_id:
            return self._serving.infer(inputs)
        active = self._serving.current()
        outputs = self._serving.infer(inputs, active)
        if active is not None:
            self._feedback.remember(request_id, active, outputs)
        return outputs

    def feedback(self, request_id: str, label: int | float | str | list[int | float | str]) -> FeedbackResult:
        """Label an earlier prediction (`infer(..., request_id=...)` or an endpoint request with that `id`): a class
        index, class name or value, or a list with one per row; counted in the telemetry window it arrives in.

        Raises `UnknownRequestError` (not remembered), `AlreadyLabelledError` (a label counts once),
        `LabelMismatchError` (wrong kind or count), `FeedbackBodyError`, and `NoModelError` before a model is loaded.
        """
        active = self._serving.current()
        if active is None:
            raise NoModelError("no model is loaded yet")
        body = {"id": request_id, "labels": label} if isinstance(label, list) else {"id": request_id, "label": label}
        return self._feedback.label(active.spec.name, parse_feedback(body))

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
        addresses, base = self._resolve_broker()
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self._topics = Topics(base)
        self._capabilities = self._detect_capabilities()  # once: /proc/cpuinfo does not change
        self._federation = self._build_federation()  # before anything runs: a missing Flower is a ConfigError
        worker = self._build_update_path()
        worker.boot()
        try:
            self._start_endpoint()
            self._start_messaging(addresses, base)
            worker.start()
            if self._federation is not None:
                self._federation.start()
        except BaseException:
            self._shutdown(report=False)
            raise
        self._started = True
        self._credentials.start_renewal()
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

    def _resolve_broker(self) -> tuple[tuple[BrokerAddress, ...], str]:
        """The brokers' addresses and the topic base, from the configuration or the enrolled identity."""
        return self._credentials.load()

    @property
    def certificate_serial(self) -> int | None:
        """Serial number of the certificate this device presents (None when it has no fleet identity)."""
        return self._credentials.certificate_serial

    def _detect_capabilities(self) -> Capabilities:
        """What this device reports it can run: detected, then the configured overrides."""
        detected = device_capabilities(self._catalog)
        overrides = {"cpu_features": self.config.cpu_features, "memory_mb": self.config.memory_mb}
        return detected.model_copy(update={k: v for k, v in overrides.items() if v is not None})

    def _build_update_path(self) -> UpdateWorker:
        """The fetcher, the executor of update steps and the worker that drives them (not started yet)."""
        cfg, identity = self.config, self._credentials.identity
        self._fetcher = ArtifactFetcher(
            timeout_s=cfg.download_timeout_s,
            attempts=cfg.download_attempts,
            min_rate_bps=cfg.download_min_rate_bps,
            base_url=cfg.coordinator_url or (identity.coordinator_url if identity else None),
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
            gate=self._trust_gate(),
            on_refused=self._on_refused,
        )
        return self._worker

    def _trust_gate(self) -> Callable[[DesiredState], DesiredState] | None:
        """The governance check of desired states, for a device enrolled with the fleet's TUF root."""
        if self._credentials.identity is None:
            return None  # ungoverned: no fleet identity, so no TUF root (tuf is not loaded)
        from agent.trust import trust_gate_for

        timeout_s = min(self.config.download_timeout_s, 30.0)
        return trust_gate_for(self._credentials.identity, self.config.data_dir / "tuf", timeout_s)

    def _on_refused(self, desired: DesiredState, error: ErrorInfo) -> None:
        """A desired state whose signed metadata did not verify: report why; nothing else changes."""
        with self._lock:
            self._refused = (desired.generation, error)
        self._event(EventKind.UPDATE_REFUSED, generation=desired.generation, message=error.message, error=error)
        self._report()

    def _build_federation(self) -> SupernodeSupervisor | None:
        """The SuperNode's supervisor when `federated` (not started); `ConfigError` when it cannot work here."""
        cfg, identity = self.config, self._credentials.identity
        if not cfg.federated:
            return None
        from agent.federation import SupernodeSupervisor, configured_federation, fetch_federation, locate_supernode
        from agent.samples import sample_store_path

        supernode = locate_supernode(cfg.flower_bin_dir)
        if identity is None:
            raise ConfigError(
                "federated = true needs an enrolled device (its enrolment key authenticates the SuperNode): "
                "run `edgefleet-agent enroll`"
            )
        locate: Callable[[], FederationInfo]
        if cfg.superlink is not None and cfg.superlink_root_certificates is not None:
            if not cfg.superlink_root_certificates.is_file():
                raise ConfigError(f"superlink_root_certificates: {cfg.superlink_root_certificates} is not a file")
            locate = configured_federation(cfg.superlink, cfg.superlink_root_certificates)
        else:
            coordinator = cfg.coordinator_url or identity.coordinator_url
            locate = functools.partial(fetch_federation, coordinator, min(cfg.download_timeout_s, 10.0))

        def key_path() -> Path:  # renewal may replace the identity (and, with a new key, its key file)
            current = self._credentials.identity
            assert current is not None, "an enrolled agent keeps its identity"
            return current.key_path

        return SupernodeSupervisor(
            device_id=cfg.device_id,
            data_dir=cfg.data_dir,
            supernode=supernode,
            key_path=key_path,
            store_path=sample_store_path(cfg.data_dir),
            locate=locate,
            on_refused=self._on_federated_refused,
        )

    def _on_federated_refused(self, reason: str) -> None:
        """The SuperLink refused this device's SuperNode: a `federated.refused` event."""
        self._event(EventKind.FEDERATED_REFUSED, message=reason[:4096])

    def _start_endpoint(self) -> None:
        """Serve the local inference endpoint, unless `http_port` disables it."""
        cfg = self.config
        if cfg.http_port is None:
            return
        self._server = InferenceServer(
            create_app(
                self._serving,
                version=agent_version(),
                max_request_bytes=cfg.http_max_request_bytes,
                token=cfg.http_token,
                samples=self._samples,
                metrics=self._metrics,
                feedback=self._feedback,
            ),
            host=cfg.http_host,
            port=cfg.http_port,
            name=cfg.device_id,
        )
        self._server.start()

    def _start_messaging(self, addresses: tuple[BrokerAddress, ...], base: str) -> None:
        """Build the MQTT transport (with the offline last will) and the telemetry publisher, then start both."""
        cfg, topics = self.config, self._topics
        assert topics is not None, "set by start() before messaging starts"
        offline = ReportedState(device_id=cfg.device_id, status=DeviceStatus.OFFLINE, tags=cfg.tags)
        identity, credentials = self._credentials.identity, self._credentials
        # An enrolled device connects as itself: the fleet's brokers refuse any other client id for its certificate.
        default_id = cfg.device_id if identity is not None else client_id_for(cfg.device_id, base)
        self._transport = MqttTransport(
            addresses=addresses,
            tls=credentials.tls_for(addresses[0]),  # one TLS setting for all (`parse_mqtt_urls`)
            client_id=cfg.mqtt_client_id or default_id,
            subscriptions=[topics.desired(cfg.device_id), topics.ack(cfg.device_id)],
            will=(topics.reported(cfg.device_id), encode(offline)),
            reconnect_min_s=cfg.reconnect_min_s,
            reconnect_max_s=cfg.reconnect_max_s,
            rediscover=credentials.locate_broker if credentials.may_rediscover else None,
            rediscover_after=cfg.broker_rediscover_after,
        )
        self._telemetry = self._telemetry_publisher(self._transport)
        self._reports = ReportCoalescer(self._publish_report, interval_s=cfg.report_interval_s)
        self._transport.start(on_message=self._on_message, on_connect=self._on_connect)
        self._telemetry.start()

    # -- internals --------------------------------------------------------------------------------

    def _shutdown(self, *, report: bool) -> None:
        self._credentials.stop()
        if self._federation is not None:
            self._federation.stop()  # first: it takes a few seconds, and a SuperNode must not outlive the agent
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
            if self._reports is not None:
                self._reports.close()  # no trailing `online` after the goodbye
            self._transport.close(timeout=5.0)
        if self._server is not None:
            self._server.stop()
        if self._samples is not None:
            self._samples.close()
        if self._fetcher is not None:
            self._fetcher.close()
        self._transport = self._telemetry = self._server = self._fetcher = None
        self._reports = None

    def _on_connect(self) -> None:
        if self._telemetry is not None:
            self._telemetry.connected()
        self._report()
        transport = self._transport
        brokers = transport.addresses if isinstance(transport, MqttTransport) else None
        if self._brokers is not None and brokers is not None and brokers != self._brokers:  # not a failover in a list
            named = [",".join(f"{a.host}:{a.port}" for a in each) for each in (self._brokers, brokers)]
            moved = f"broker moved from {named[0]} to {named[1]}"
            log.warning("%s (the coordinator named it after failed connects; kept for restarts)", moved)
            self._event(EventKind.BROKER_MOVED, message=moved)
        self._brokers = brokers

    def _on_message(self, topic: str, payload: bytes) -> None:
        assert self._topics is not None
        if topic == self._topics.ack(self.config.device_id):
            self._on_ack(topic, payload)
            return
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

    def _on_ack(self, topic: str, payload: bytes) -> None:
        if not payload or self._telemetry is None:
            return
        try:
            ack = decode(TelemetryAck, payload)
        except MalformedMessageError as exc:
            self._reject(topic, str(exc))
            return
        if ack.device_id != self.config.device_id:
            self._reject(topic, f"telemetry ack for device {ack.device_id!r} on the topic of {self.config.device_id!r}")
            return
        self._telemetry.acknowledged(ack)

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
        # Every phase has its event (the history); the retained report of a phase in the middle of an update is
        # coalesced (`agent.reporting`), the end of an update published at once.
        self._report(coalesce=not must_flush(new.phase))

    def _report(self, status: DeviceStatus = DeviceStatus.ONLINE, *, coalesce: bool = False) -> None:
        """Publish the retained reported state now, or with `coalesce` at most once per `report_interval_s`."""
        reports = self._reports
        if reports is None:
            return  # messaging not started (or stopped): nobody to tell
        if coalesce:
            reports.report()
        elif status is DeviceStatus.ONLINE:
            reports.flush()
        else:
            reports.flush(functools.partial(self._publish_report, status))

    def _publish_report(self, status: DeviceStatus = DeviceStatus.ONLINE) -> None:
        """The reported state of this moment, published retained."""
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
            refused=self._refused[1] if self._refused else None,
            refused_generation=self._refused[0] if self._refused else None,
        )
        transport.publish(topics.reported(self.config.device_id), encode(state), qos=1, retain=True)

    def _event(self, kind: EventKind, **fields: object) -> None:
        transport, topics = self._transport, self._topics
        if transport is None or topics is None:
            return
        event = DeviceEvent(device_id=self.config.device_id, kind=kind, **fields)
        transport.publish(topics.events(self.config.device_id), encode(event), qos=1)

    def _store_labels(self, model: str, labelled: list[tuple[str, list[int | float]]]) -> None:
        """Hand labels taken by `feedback` on to the sample store (federated retraining) when `model` is sampled."""
        samples = self._samples
        if samples is None or not samples.opted_in(model):
            return
        from agent.samples import LabelEntry

        entries = [LabelEntry(rid, labels[0] if len(labels) == 1 else list(labels)) for rid, labels in labelled]
        try:
            samples.label(model, entries)
        except Exception:  # the labels are counted already; the store logs and counts its own failures
            log.warning("labels of %s could not be stored in the sample store", model, exc_info=True)

    def _metrics_reading(self) -> AgentReading:
        """What `GET /metrics` reads at scrape time."""
        worker = self._worker
        return AgentReading(
            version=agent_version(),
            model=self.active_model,
            update_phase=worker.state.phase.value if worker is not None else None,
            telemetry_unconfirmed=len(self.telemetry_unconfirmed),
            telemetry_dropped=self.telemetry_dropped,
            supernode_state=self.federation_status.state,
            rejected_messages=self._rejected,
        )

    def _telemetry_publisher(self, transport: MqttTransport) -> TelemetryPublisher:
        """Windows on disk until the coordinator confirms them (`agent.outbox`), unless the outbox is disabled."""
        cfg = self.config
        outbox = None
        if cfg.telemetry_outbox_windows > 0:
            outbox = Outbox(
                cfg.data_dir / "telemetry",
                max_windows=cfg.telemetry_outbox_windows,
                max_bytes=cfg.telemetry_outbox_bytes,
            )
        return TelemetryPublisher(
            device_id=cfg.device_id,
            recorder=self._recorder,
            seq=SeqCounter(cfg.data_dir / SEQ_FILE, used=outbox.highest if outbox is not None else None),
            publish=self._publish_telemetry,
            republish=self._republish_telemetry,
            interval_s=cfg.telemetry_interval_s,
            outbox=outbox,
            resend_s=cfg.telemetry_resend_s,
            is_connected=lambda: transport.connected,
            backlog=lambda: transport.unacknowledged,
        )

    def _publish_telemetry(self, window: TelemetryWindow) -> None:
        self._republish_telemetry(window)
        with self._lock:
            self._sent_seqs.append(window.seq)
            del self._sent_seqs[:-MAX_SENT_SEQS]

    def _republish_telemetry(self, window: TelemetryWindow) -> None:
        transport, topics = self._transport, self._topics
        if transport is None or topics is None:
            raise TransportError("telemetry published before the transport started")
        transport.publish(topics.telemetry(self.config.device_id), encode(window), qos=1)
