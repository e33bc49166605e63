"""Registry tables and their API shapes, as SQLModel families (`XBase → X(table=True) → XPublic`), one module
per entity group: `registry` (models, versions), `devices` (devices, events, telemetry windows), `telemetry` (each
device's chain of windows and its gaps), `deployments`, `rollouts`, `identity` (enrolment, certificates, API
tokens), `governance` (cards, TUF metadata, approvals, audit).

The same definitions run on SQLite and PostgreSQL: JSON columns use the portable `JSON` type and
timestamps are stored timezone-aware (SQLite hands them back naive; `as_utc` restores the zone).
"""

from cloud.models._common import as_utc
from cloud.models.deployments import (
    Deployment,
    DeploymentBase,
    DeploymentPublic,
    DeploymentsPublic,
    DeploymentTarget,
    DeploymentTargetBase,
    DeploymentTargetPublic,
    TargetStatus,
)
from cloud.models.devices import (
    Device,
    DeviceBase,
    DeviceEventPublic,
    DeviceEventRecord,
    DeviceEventsPublic,
    DevicePublic,
    DevicesPublic,
    EnrolmentState,
    TelemetryRecord,
    TelemetryWindowPublic,
    TelemetryWindowsPublic,
)
from cloud.models.governance import (
    ApprovalSignature,
    Approver,
    AuditCheckpoint,
    AuditEntry,
    AuditEntryPublic,
    ModelCard,
    TufMetadata,
)
from cloud.models.identity import (
    ApiToken,
    ApiTokenPublic,
    BootstrapSecret,
    DeviceCertificate,
    EnrolmentToken,
)
from cloud.models.registry import (
    Model,
    ModelPublic,
    ModelsPublic,
    ModelVersion,
    ModelVersionBase,
    ModelVersionPublic,
)
from cloud.models.rollouts import (
    Rollout,
    RolloutBase,
    RolloutCommandRecord,
    RolloutDecisionPublic,
    RolloutDecisionRecord,
    RolloutDetailPublic,
    RolloutDevicePublic,
    RolloutDispatchRecord,
    RolloutPublic,
    RolloutsPublic,
    RolloutWavePublic,
)
from cloud.models.telemetry import TelemetryChain, TelemetryGap, TelemetryGapsPublic

__all__ = [
    "ApiToken",
    "ApiTokenPublic",
    "ApprovalSignature",
    "Approver",
    "AuditCheckpoint",
    "AuditEntry",
    "AuditEntryPublic",
    "BootstrapSecret",
    "Deployment",
    "DeploymentBase",
    "DeploymentPublic",
    "DeploymentTarget",
    "DeploymentTargetBase",
    "DeploymentTargetPublic",
    "DeploymentsPublic",
    "Device",
    "DeviceBase",
    "DeviceCertificate",
    "DeviceEventPublic",
    "DeviceEventRecord",
    "DeviceEventsPublic",
    "DevicePublic",
    "DevicesPublic",
    "EnrolmentState",
    "EnrolmentToken",
    "Model",
    "ModelCard",
    "ModelPublic",
    "ModelVersion",
    "ModelVersionBase",
    "ModelVersionPublic",
    "ModelsPublic",
    "Rollout",
    "RolloutBase",
    "RolloutCommandRecord",
    "RolloutDecisionPublic",
    "RolloutDecisionRecord",
    "RolloutDetailPublic",
    "RolloutDevicePublic",
    "RolloutDispatchRecord",
    "RolloutPublic",
    "RolloutWavePublic",
    "RolloutsPublic",
    "TargetStatus",
    "TelemetryChain",
    "TelemetryGap",
    "TelemetryGapsPublic",
    "TelemetryRecord",
    "TelemetryWindowPublic",
    "TelemetryWindowsPublic",
    "TufMetadata",
    "as_utc",
]
