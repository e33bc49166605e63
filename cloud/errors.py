"""Domain errors of the coordinator. Services raise them; the API maps them to HTTP problems at the edge.

Exception tree::

    CloudError                        anything the coordinator refuses or cannot do
    ├── RequestError                  the caller is at fault; retrying the same request cannot help
    │   ├── NotFoundError             (404) a model, version, artifact, device or deployment does not exist
    │   ├── ConflictError             (409) it exists already (same model name and version pushed twice)
    │   ├── InvalidInputError         (422) the input is well-formed but unusable; `field` names the culprit
    │   │   ├── InvalidModelError         the uploaded file is not a model of the declared format
    │   │   └── EmptyTargetError          a deployment target that matches no device
    │   ├── UnauthorizedError         (401) no valid credentials (API token, enrolment token, device identity)
    │   ├── ForbiddenError            (403) valid credentials whose role may not do this
    │   └── PayloadTooLargeError      (413) a request body above the configured limit
    ├── ConfigurationError            the operator's settings are unusable (fatal at start-up)
    ├── BackupError                   a backup cannot be made or restored: missing tool, bad archive, busy target
    └── TransientError                an external system failed; retrying later may help
        ├── BrokerStartError          the embedded MQTT broker could not listen
        ├── PublishError              a desired state could not be handed to the broker
        ├── FlowerError               a `flwr` control call failed (cloud/federation/flower.py; Flower's own text)
        │   └── FlowerUnavailableError    no Flower environment, or the SuperLink does not answer
        └── SuperLinkStartError       the supervised SuperLink could not start (cloud/federation/superlink.py)
"""

from __future__ import annotations

__all__ = [
    "BackupError",
    "BrokerStartError",
    "CloudError",
    "ConfigurationError",
    "ConflictError",
    "EmptyTargetError",
    "ForbiddenError",
    "InvalidInputError",
    "InvalidModelError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PublishError",
    "RequestError",
    "TransientError",
    "UnauthorizedError",
]


class CloudError(Exception):
    """Base of every coordinator error; `retryable` says whether trying again can help."""

    retryable: bool = False


class RequestError(CloudError):
    """A request the caller must change before it can succeed."""

    status_code: int = 400


class NotFoundError(RequestError):
    """The named thing does not exist."""

    status_code = 404


class ConflictError(RequestError):
    """The thing to create exists already."""

    status_code = 409


class InvalidInputError(RequestError):
    """Input that parses but cannot be used; `field` names the offending input when known."""

    status_code = 422

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidModelError(InvalidInputError):
    """An uploaded file that is not a valid model of its declared format."""


class EmptyTargetError(InvalidInputError):
    """A deployment target that selects no device."""


class UnauthorizedError(RequestError):
    """A request without valid credentials."""

    status_code = 401


class ForbiddenError(RequestError):
    """A request whose credentials are valid but whose role may not do it."""

    status_code = 403


class PayloadTooLargeError(RequestError):
    """A request body larger than the limit for its route."""

    status_code = 413


class ConfigurationError(CloudError):
    """Settings the coordinator refuses to run with (e.g. a placeholder secret in production)."""


class BackupError(CloudError):
    """A backup or restore that cannot proceed (pg_dump missing, unreadable archive, non-empty target, ...)."""


class TransientError(CloudError):
    """A failure of an external system; the same operation may succeed later."""

    retryable = True


class BrokerStartError(TransientError):
    """The embedded MQTT broker did not start listening."""


class PublishError(TransientError):
    """A message could not be handed to the MQTT broker."""
