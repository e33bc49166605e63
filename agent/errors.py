"""Errors of the agent, each saying who is at fault and whether a retry can help.

Exception tree::

    AgentError                        base; `code` is the `protocol.ErrorCode` reported for it
    ├── ConfigError                   a bad configuration file or environment (operator's fault; fatal)
    ├── TransportError                the broker or coordinator is unreachable (retryable)
    ├── NoModelError                  an inference was asked for while no model is loaded (retry later)
    ├── InferenceInputError           the caller's tensors do not fit the model (caller's fault; fatal)
    ├── InferenceFailedError          the runtime failed on valid input (internal)
    ├── FeedbackError                 a label fed back cannot be taken (caller's fault; fatal)
    │   ├── FeedbackBodyError         the body is not the documented shape (HTTP 400)
    │   ├── UnknownRequestError       no remembered prediction has that id: never seen or forgotten (404)
    │   ├── AlreadyLabelledError      the prediction already got its label; a label counts once (409)
    │   └── LabelMismatchError        the label is of the wrong kind or count for the prediction (422)
    └── UpdateError                   a step of the update path failed
        ├── DownloadError             the artifact could not be fetched (retryable: network)
        ├── ArtifactVerificationError size or sha256 differ from the desired state (fatal: bad artifact)
        ├── StorageError              the data directory could not be written (retryable: disk)
        ├── UnsupportedFormatError    no runtime for the artifact's format (fatal)
        ├── InvalidModelError         the runtime refused the file, or its tensors differ from the spec (fatal)
        ├── WarmupError               the warm-up inference failed or produced non-finite output (fatal)
        └── HealthCheckError          the shadow run or the trial after the switch failed (fatal)

Whether a retry helps follows the code (`ErrorCode.is_retryable`), so the agent and the coordinator
agree on it. `error_info()` turns any of them into the `protocol.ErrorInfo` the device reports.
"""

from __future__ import annotations

from protocol import ErrorCode, ErrorInfo

__all__ = [
    "AgentError",
    "AlreadyLabelledError",
    "ArtifactVerificationError",
    "ConfigError",
    "DownloadError",
    "FeedbackBodyError",
    "FeedbackError",
    "HealthCheckError",
    "InferenceFailedError",
    "InferenceInputError",
    "InvalidModelError",
    "LabelMismatchError",
    "NoModelError",
    "StorageError",
    "TransportError",
    "UnknownRequestError",
    "UnsupportedFormatError",
    "UpdateError",
    "WarmupError",
]


class AgentError(Exception):
    """Base of every error raised by the agent."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def retryable(self) -> bool:
        """True when the same operation may succeed later."""
        return self.code.is_retryable

    def error_info(self) -> ErrorInfo:
        """This error as the device reports it."""
        return ErrorInfo.of(self.code, str(self))


class ConfigError(AgentError):
    """The agent's configuration is invalid; the message names the key and the reason."""


class TransportError(AgentError):
    """The broker or the coordinator could not be reached."""

    code = ErrorCode.DOWNLOAD_FAILED


class NoModelError(AgentError):
    """No model is loaded yet, so there is nothing to run the inference on."""


class InferenceInputError(AgentError):
    """The request's tensors do not match the model's inputs (wrong name, shape, datatype or length)."""

    code = ErrorCode.MALFORMED_MESSAGE


class InferenceFailedError(AgentError):
    """The runtime failed while running a valid request."""


class FeedbackError(AgentError):
    """A label fed back for an earlier prediction that the agent cannot take; nothing of it was counted.

    `refused` lists every refused item of the body as `(index, request id, reason, message)` (a body is taken
    whole or not at all); `reason` is the metric's label (`unknown_id`, `duplicate`, `wrong_kind`, `malformed`).
    """

    code = ErrorCode.MALFORMED_MESSAGE
    reason = "malformed"

    def __init__(self, message: str, *, refused: list[tuple[int, str, str, str]] | None = None) -> None:
        super().__init__(message)
        self.refused = refused if refused is not None else []


class FeedbackBodyError(FeedbackError):
    """The feedback body is not JSON or not the documented shape."""


class UnknownRequestError(FeedbackError):
    """No remembered prediction has this id: it never had one, or it was forgotten past the bound."""

    reason = "unknown_id"


class AlreadyLabelledError(FeedbackError):
    """The prediction already got its label: a label counts once."""

    reason = "duplicate"


class LabelMismatchError(FeedbackError):
    """The label is of the wrong kind (class vs value, unknown class) or count (one per row) for the prediction."""

    reason = "wrong_kind"


class UpdateError(AgentError):
    """A step of the update path failed; the previous model keeps serving."""


class DownloadError(UpdateError):
    """The artifact could not be downloaded."""

    code = ErrorCode.DOWNLOAD_FAILED


class ArtifactVerificationError(UpdateError):
    """The downloaded artifact differs from what the desired state declares."""

    code = ErrorCode.DIGEST_MISMATCH


class StorageError(UpdateError):
    """Files under the data directory could not be written or read."""

    code = ErrorCode.STORAGE_FAILED


class UnsupportedFormatError(UpdateError):
    """No runtime on this device can load the artifact's format."""

    code = ErrorCode.UNSUPPORTED_FORMAT


class InvalidModelError(UpdateError):
    """The runtime could not load the file, or its tensors differ from the declared ones."""

    code = ErrorCode.INVALID_MODEL


class WarmupError(UpdateError):
    """The warm-up inference failed or produced non-finite outputs."""

    code = ErrorCode.WARMUP_FAILED


class HealthCheckError(UpdateError):
    """The candidate failed its shadow run before the switch, or its trial after it."""

    code = ErrorCode.HEALTH_CHECK_FAILED
