"""Message schemas of the cloud ↔ agent wire (pydantic v2), each carrying `schema_version`.

Desired/reported flow: the coordinator publishes a device's `DesiredState` retained, and the agent
reconciles towards it and publishes its `ReportedState` retained. A device that was offline converges
when it reconnects, because the broker hands it the retained desired state; nothing is resent.

Messages ignore unknown fields, so a newer peer may add fields within one schema version; a change
that an older peer would misread bumps `SCHEMA_VERSION`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from protocol.errors import ErrorCode
from protocol.outputs import OutputSemantics
from protocol.sketches import WindowSketches
from protocol.topics import DEVICE_ID_PATTERN

SCHEMA_VERSION = 1

DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN)]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
Version = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")]


def utcnow() -> datetime:
    """Timezone-aware current time in UTC."""
    return datetime.now(UTC)


class _Part(BaseModel):
    """A nested part of a message: immutable, unknown fields ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class Message(_Part):
    """A top-level message on a topic."""

    schema_version: int = SCHEMA_VERSION


class ModelFormat(StrEnum):
    """Serialized model formats a runtime can load."""

    ONNX = "onnx"
    TFLITE = "tflite"


class Datatype(StrEnum):
    """Tensor element types, named as in the Open Inference Protocol (KServe v2)."""

    BOOL = "BOOL"
    UINT8 = "UINT8"
    INT8 = "INT8"
    INT16 = "INT16"
    INT32 = "INT32"
    INT64 = "INT64"
    FP16 = "FP16"
    FP32 = "FP32"
    FP64 = "FP64"


# ONNX element types (`onnx.TensorProto.DataType` names) that devices can serve, as OIP datatypes.
ONNX_DATATYPES: dict[str, Datatype] = {
    "BOOL": Datatype.BOOL,
    "UINT8": Datatype.UINT8,
    "INT8": Datatype.INT8,
    "INT16": Datatype.INT16,
    "INT32": Datatype.INT32,
    "INT64": Datatype.INT64,
    "FLOAT16": Datatype.FP16,
    "FLOAT": Datatype.FP32,
    "DOUBLE": Datatype.FP64,
}


class TensorSpec(_Part):
    """A declared model input or output; `-1` in `shape` marks a dynamic dimension."""

    name: str = Field(min_length=1, max_length=256)
    datatype: Datatype
    shape: list[int]


class ArtifactRef(_Part):
    """Where to fetch a model file and what it must hash to."""

    url: str = Field(min_length=1, max_length=2048)
    sha256: Sha256Hex
    size: int = Field(ge=0)
    format: ModelFormat = ModelFormat.ONNX


class ModelRef(_Part):
    """One model version, identified by name, version and content digest."""

    name: Name
    version: Version
    sha256: Sha256Hex


class ModelSpec(_Part):
    """The model a device should run: identity, artifact and declared tensors."""

    name: Name
    version: Version
    artifact: ArtifactRef
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(default_factory=list)
    # Which of the version's artifacts this is (e.g. `int8-static`, `tflite-int8`); the coordinator picks it
    # from the device's reported capabilities. Informational: the artifact digest is what the device checks.
    variant: str | None = Field(default=None, max_length=64)
    # How the outputs read (classifier, regressor), declared at push time; None: the agent infers it from the
    # loaded model's outputs (`protocol.outputs.infer_output_semantics`).
    output_semantics: OutputSemantics | None = None

    @property
    def ref(self) -> ModelRef:
        """The identity of this model version."""
        return ModelRef(name=self.name, version=self.version, sha256=self.artifact.sha256)


class DesiredState(Message):
    """What the coordinator wants a device to run. `generation` grows with every change."""

    device_id: DeviceId
    generation: int = Field(ge=0)
    deployment_id: str | None = None
    model: ModelSpec | None = None
    issued_at: datetime = Field(default_factory=utcnow)
    # The director's signed instruction (`protocol.governance`): what a governed device actually trusts. The
    # unsigned fields above only say where to download from; the digests that count come from signed metadata.
    director: str | None = Field(default=None, max_length=65536)


class ErrorInfo(_Part):
    """Why something failed, and whether retrying can help."""

    code: ErrorCode
    message: str = Field(max_length=4096)
    retryable: bool = False

    @classmethod
    def of(cls, code: ErrorCode, message: str) -> ErrorInfo:
        """An `ErrorInfo` whose `retryable` follows the code."""
        return cls(code=code, message=message[:4096], retryable=code.is_retryable)


class UpdatePhase(StrEnum):
    """Where a device is on the update path (the agent's persisted state machine)."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGING = "staging"
    LOADING = "loading"
    WARMING_UP = "warming_up"  # older agents' name of the health check
    HEALTH_CHECK = "health_check"
    SHADOW = "shadow"
    SWITCHING = "switching"
    COMMITTING = "committing"  # switched, serving on trial until committed (or rolled back)
    ACTIVE = "active"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"  # the trial failed after the switch; the previous model serves again


class UpdateStatus(_Part):
    """Progress of the device towards one desired generation."""

    generation: int = Field(ge=0)
    phase: UpdatePhase
    target: ModelRef | None = None
    error: ErrorInfo | None = None


class Capabilities(_Part):
    """What a device can run: runtimes, CPU and memory."""

    runtimes: list[str] = Field(default_factory=list)
    arch: str = ""
    cpu_features: list[str] = Field(default_factory=list)
    memory_mb: int | None = None
    os: str = ""


class DeviceStatus(StrEnum):
    """Connectivity as the device (or its last will) reports it."""

    ONLINE = "online"
    OFFLINE = "offline"


class ReportedState(Message):
    """What a device runs and how its update is going. Its last will carries only `status=offline`."""

    device_id: DeviceId
    status: DeviceStatus = DeviceStatus.ONLINE
    active_model: ModelRef | None = None
    update: UpdateStatus | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    agent_version: str | None = None
    capabilities: Capabilities | None = None
    inference_url: str | None = None
    reported_at: datetime = Field(default_factory=utcnow)
    # The last desired state this device refused because its signed metadata did not verify, and why.
    refused: ErrorInfo | None = None
    refused_generation: int | None = None


class EventKind(StrEnum):
    """Kinds of device events."""

    UPDATE_STARTED = "update.started"
    UPDATE_PROGRESS = "update.progress"
    UPDATE_FAILED = "update.failed"
    UPDATE_ACTIVATED = "update.activated"
    UPDATE_REFUSED = "update.refused"  # signed metadata did not verify: nothing changed, the current model serves
    MESSAGE_REJECTED = "message.rejected"
    AGENT_STARTED = "agent.started"
    BROKER_MOVED = "broker.moved"  # the enrolled broker address stopped answering; the coordinator named another
    FEDERATED_REFUSED = "federated.refused"  # the SuperLink refused this device's SuperNode (key not registered)


class DeviceEvent(Message):
    """A progress or failure event from a device (not retained)."""

    device_id: DeviceId
    kind: EventKind
    generation: int | None = None
    phase: UpdatePhase | None = None
    message: str = Field(default="", max_length=4096)
    error: ErrorInfo | None = None
    at: datetime = Field(default_factory=utcnow)


class LatencySummary(_Part):
    """Latency percentiles of one telemetry window, in milliseconds."""

    p50_ms: float = Field(ge=0)
    p95_ms: float = Field(ge=0)
    p99_ms: float = Field(ge=0)
    max_ms: float = Field(ge=0)
    mean_ms: float = Field(ge=0)


class LabelCounts(_Part):
    """What local applications fed back in one window: how many predictions got their true label (`labelled`) and how
    many of those the model had right (`correct`, classifiers), per true class as `[labelled, correct]` pairs, and
    for regressors the sum of absolute errors. A label is counted in the window in which it arrives, whichever window
    its prediction was made in."""

    labelled: int = Field(default=0, ge=0)
    correct: int = Field(default=0, ge=0)
    by_class: dict[str, Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)]] = Field(
        default_factory=dict
    )
    abs_error_sum: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _consistent(self) -> LabelCounts:
        if self.correct > self.labelled:
            raise ValueError(f"correct {self.correct} exceeds labelled {self.labelled}")
        for name, (labelled, correct) in self.by_class.items():
            if correct > labelled:
                raise ValueError(f"class {name!r}: correct {correct} exceeds labelled {labelled}")
        return self


class TelemetryWindow(Message):
    """Counts of one reporting window. `seq` is per device and never reused, so duplicates can be dropped.

    `prev_seq` links the windows of a device into a chain: the seq of the window this agent produced just before
    this one, None when it knows of none (its first window, a counter lost with its outbox, an older agent). The
    coordinator reports a hole in the chain as a gap; seqs skipped at a window without `prev_seq` are a declared
    jump, not a loss. `dropped_windows` counts the windows this agent has dropped for good (its outbox was full).
    """

    device_id: DeviceId
    seq: int = Field(ge=0)
    prev_seq: int | None = Field(default=None, ge=0)
    dropped_windows: int = Field(default=0, ge=0)
    window_start: datetime
    window_end: datetime
    model: ModelRef | None = None
    inference_count: int = Field(ge=0)
    error_count: int = Field(ge=0)
    latency: LatencySummary | None = None
    # Counts per bucket of `protocol.telemetry.LATENCY_BUCKETS_MS` (last bucket: above the last bound),
    # so the coordinator can merge windows into exact-to-the-bucket percentiles.
    latency_histogram: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)
    class_counts: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    # KLL sketches of the window's inputs, confidence and values (`protocol.sketches`); None from older agents.
    sketches: WindowSketches | None = None
    # Labels local applications fed back during the window (`LabelCounts`); None when none arrived or an older agent.
    labels: LabelCounts | None = None

    @model_validator(mode="after")
    def _linked_backwards(self) -> TelemetryWindow:
        if self.prev_seq is not None and self.prev_seq >= self.seq:
            raise ValueError(f"prev_seq {self.prev_seq} is not below seq {self.seq}")
        return self


# Most `missing` ranges one acknowledgement carries (the newest): bounds its size.
MAX_ACK_MISSING = 32


class SeqRange(_Part):
    """The seqs `first` to `last`, both included."""

    first: int = Field(ge=0)
    last: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> SeqRange:
        if self.first > self.last:
            raise ValueError(f"first {self.first} is above last {self.last}")
        return self

    def __contains__(self, seq: object) -> bool:
        return isinstance(seq, int) and self.first <= seq <= self.last


class TelemetryAck(Message):
    """What the coordinator has stored of one device's telemetry (retained on the device's `ack` topic).

    `max_seq` is the highest stored seq. `stored_seq` is where the device's chain of windows is settled: from
    its lowest stored seq, following `TelemetryWindow.prev_seq`, every window up to it is stored, except the
    seqs in `missing` (holes reported as lost: their window never arrived within the coordinator's grace
    period) and the seqs a window without `prev_seq` skipped (a declared jump). Both None while nothing of the
    device is settled. An agent deletes a window from its outbox once `confirms(seq)`; one that lost its seq
    counter continues above `max_seq`.
    """

    device_id: DeviceId
    stored_seq: int | None = Field(default=None, ge=0)
    max_seq: int | None = Field(default=None, ge=0)
    missing: list[SeqRange] = Field(default_factory=list, max_length=MAX_ACK_MISSING)
    at: datetime = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _ordered(self) -> TelemetryAck:
        if self.stored_seq is not None and self.max_seq is None:
            raise ValueError("stored_seq is set but max_seq is null")
        if self.stored_seq is not None and self.max_seq is not None and self.stored_seq > self.max_seq:
            raise ValueError(f"stored_seq {self.stored_seq} is above max_seq {self.max_seq}")
        return self

    def confirms(self, seq: int) -> bool:
        """True if the window `seq` is stored (so an agent may forget it): settled, and not in a missing range."""
        if self.stored_seq is None or seq > self.stored_seq:
            return False
        return not any(seq in gap for gap in self.missing)
