"""Errors of the wire protocol, and the error codes devices report.

Exception tree::

    ProtocolError                     anything wrong with what crossed the wire
    ├── MalformedMessageError         payload is not a valid message of the expected kind (fatal for that message)
    │   └── UnsupportedSchemaVersionError  valid JSON, but a schema version this side does not speak
    ├── TopicError                    a topic outside the edgefleet scheme
    ├── BrokerUrlError                a broker URL that is not mqtt(s)://host[:port] (fatal: fix the configuration)
    ├── ManifestError                 a variants manifest that is unreadable or of another format version
    ├── TensorSpecError               a model file whose declared tensors cannot be read or served
    └── VerificationError             an artifact failed verification (fatal: retrying the same bytes cannot help)
        ├── ArtifactSizeMismatchError
        └── DigestMismatchError

`ErrorCode` is what a device puts in its reported state and events; each code says whether a retry can
help (`is_retryable`), so the coordinator can tell a flaky network from a bad artifact.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Reasons an update or a message failed, as reported by devices and the coordinator."""

    DOWNLOAD_FAILED = "download_failed"
    ARTIFACT_SIZE_MISMATCH = "artifact_size_mismatch"
    DIGEST_MISMATCH = "digest_mismatch"
    UNSUPPORTED_FORMAT = "unsupported_format"
    INVALID_MODEL = "invalid_model"
    WARMUP_FAILED = "warmup_failed"
    HEALTH_CHECK_FAILED = "health_check_failed"
    STORAGE_FAILED = "storage_failed"
    MALFORMED_MESSAGE = "malformed_message"
    UNTRUSTED_UPDATE = "untrusted_update"  # signed metadata (repository or director) did not verify
    INTERNAL = "internal"

    @property
    def is_retryable(self) -> bool:
        """True when the same operation may succeed later (network, disk), False when it never will."""
        return self in _RETRYABLE


_RETRYABLE = frozenset({ErrorCode.DOWNLOAD_FAILED, ErrorCode.STORAGE_FAILED, ErrorCode.INTERNAL})


class ProtocolError(Exception):
    """Base of every error raised by the protocol package."""


class MalformedMessageError(ProtocolError):
    """A payload that is not a valid message of the expected kind."""


class UnsupportedSchemaVersionError(MalformedMessageError):
    """A message whose schema version this side does not understand."""


class TopicError(ProtocolError):
    """A topic that is not part of the edgefleet topic scheme."""


class BrokerUrlError(ProtocolError, ValueError):
    """A broker URL that is not `mqtt://host[:port]` or `mqtts://host[:port]`."""


class ManifestError(ProtocolError, ValueError):
    """A variants manifest (`variants.json`) that cannot be read, or is of a format version this side does not read."""


class TensorSpecError(ProtocolError, ValueError):
    """A model file that does not parse, or declares a tensor type devices cannot serve."""


class VerificationError(ProtocolError):
    """An artifact that failed verification; `code` says which check failed."""

    code: ErrorCode = ErrorCode.DIGEST_MISMATCH


class ArtifactSizeMismatchError(VerificationError):
    """The artifact's size differs from the size the desired state declares."""

    code = ErrorCode.ARTIFACT_SIZE_MISMATCH


class DigestMismatchError(VerificationError):
    """The artifact's sha256 differs from the digest the desired state declares."""

    code = ErrorCode.DIGEST_MISMATCH
