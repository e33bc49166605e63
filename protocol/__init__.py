"""The wire between coordinator and agent: topics, message schemas, codec and artifact verification.

Imports no other edgefleet package; both sides depend on it and meet only through it and the network.
"""

from protocol.codec import decode, encode
from protocol.errors import (
    ArtifactSizeMismatchError,
    DigestMismatchError,
    ErrorCode,
    MalformedMessageError,
    ProtocolError,
    TopicError,
    UnsupportedSchemaVersionError,
    VerificationError,
)
from protocol.messages import (
    SCHEMA_VERSION,
    ArtifactRef,
    Capabilities,
    Datatype,
    DesiredState,
    DeviceEvent,
    DeviceStatus,
    ErrorInfo,
    EventKind,
    LatencySummary,
    Message,
    ModelFormat,
    ModelRef,
    ModelSpec,
    ReportedState,
    TelemetryWindow,
    TensorSpec,
    UpdatePhase,
    UpdateStatus,
    utcnow,
)
from protocol.topics import DEFAULT_BASE, Channel, Topics, validate_device_id
from protocol.verification import sha256_file, verify_artifact

__all__ = [
    "DEFAULT_BASE",
    "SCHEMA_VERSION",
    "ArtifactRef",
    "ArtifactSizeMismatchError",
    "Capabilities",
    "Channel",
    "Datatype",
    "DesiredState",
    "DeviceEvent",
    "DeviceStatus",
    "DigestMismatchError",
    "ErrorCode",
    "ErrorInfo",
    "EventKind",
    "LatencySummary",
    "MalformedMessageError",
    "Message",
    "ModelFormat",
    "ModelRef",
    "ModelSpec",
    "ProtocolError",
    "ReportedState",
    "TelemetryWindow",
    "TensorSpec",
    "TopicError",
    "Topics",
    "UnsupportedSchemaVersionError",
    "UpdatePhase",
    "UpdateStatus",
    "VerificationError",
    "decode",
    "encode",
    "sha256_file",
    "utcnow",
    "validate_device_id",
    "verify_artifact",
]
