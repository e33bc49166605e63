"""The edgefleet device agent: `Agent(AgentConfig(...)).start()`.

It reconciles towards the desired state it receives over MQTT (a persisted update state machine over
two slots), serves the active model on a local Open Inference Protocol endpoint, and reports state,
events and telemetry. Among edgefleet packages it imports `protocol` only: never `compression` or `cloud`.
"""

from agent.config import AgentConfig, load_config
from agent.daemon import Agent
from agent.errors import (
    AgentError,
    ArtifactVerificationError,
    ConfigError,
    DownloadError,
    InferenceFailedError,
    InferenceInputError,
    InvalidModelError,
    NoModelError,
    StorageError,
    TransportError,
    UnsupportedFormatError,
    UpdateError,
    WarmupError,
)
from agent.runtime import LoadedModel, ModelRuntime, available_runtimes

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentError",
    "ArtifactVerificationError",
    "ConfigError",
    "DownloadError",
    "InferenceFailedError",
    "InferenceInputError",
    "InvalidModelError",
    "LoadedModel",
    "ModelRuntime",
    "NoModelError",
    "StorageError",
    "TransportError",
    "UnsupportedFormatError",
    "UpdateError",
    "WarmupError",
    "available_runtimes",
    "load_config",
]
