"""The edgefleet device agent: `Agent(AgentConfig(...)).start()`.

It reconciles towards the desired state it receives over MQTT (a persisted update state machine over
two slots), serves the active model on a local Open Inference Protocol endpoint, and reports state,
events and telemetry. Among edgefleet packages it imports `protocol` only: never `compression` or `cloud`.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.config import AgentConfig, load_config
    from agent.daemon import Agent
    from agent.errors import (
        AgentError,
        AlreadyLabelledError,
        ArtifactVerificationError,
        ConfigError,
        DownloadError,
        FeedbackBodyError,
        FeedbackError,
        InferenceFailedError,
        InferenceInputError,
        InvalidModelError,
        LabelMismatchError,
        NoModelError,
        StorageError,
        TransportError,
        UnknownRequestError,
        UnsupportedFormatError,
        UpdateError,
        WarmupError,
    )
    from agent.runtime import LoadedModel, ModelRuntime, available_runtimes

# Names are loaded on first use (PEP 562): `import agent.errors` or `agent.cli` does not pull in the daemon, its
# HTTP server and MQTT client until something asks for them.
_HOMES = {
    "Agent": "agent.daemon",
    "AgentConfig": "agent.config",
    "load_config": "agent.config",
    "LoadedModel": "agent.runtime",
    "ModelRuntime": "agent.runtime",
    "available_runtimes": "agent.runtime",
}


def __getattr__(name: str) -> Any:
    import importlib

    if name not in __all__:
        raise AttributeError(f"module 'agent' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES.get(name, "agent.errors")), name)
    globals()[name] = value
    return value


__all__ = [
    "Agent",
    "AgentConfig",
    "AgentError",
    "AlreadyLabelledError",
    "ArtifactVerificationError",
    "ConfigError",
    "DownloadError",
    "FeedbackBodyError",
    "FeedbackError",
    "InferenceFailedError",
    "InferenceInputError",
    "InvalidModelError",
    "LabelMismatchError",
    "LoadedModel",
    "ModelRuntime",
    "NoModelError",
    "StorageError",
    "TransportError",
    "UnknownRequestError",
    "UnsupportedFormatError",
    "UpdateError",
    "WarmupError",
    "available_runtimes",
    "load_config",
]
