"""Fleets of real agents for tests, demos, load and fault injection."""

from simulators.coordinator import CoordinatorError, CoordinatorProcess
from simulators.drift import Drift, parse_drift
from simulators.faults import (
    ArtifactFaults,
    FaultyArtifactServer,
    ServedRequest,
    nan_model,
    nan_on_live_input_model,
    shifted_model,
    slow_model,
)
from simulators.fleet import MIXED_PROFILES, DeviceProfile, FleetConfig, SimulatedFleet, device_id, device_tags
from simulators.pacing import PacedDevice, PacedTraffic
from simulators.traffic import (
    DeviceTraffic,
    LabelledTraffic,
    SampleSource,
    drive_inference,
    send_labelled,
    send_labelled_traffic,
)

__all__ = [
    "MIXED_PROFILES",
    "ArtifactFaults",
    "CoordinatorError",
    "CoordinatorProcess",
    "DeviceProfile",
    "DeviceTraffic",
    "Drift",
    "FaultyArtifactServer",
    "FleetConfig",
    "LabelledTraffic",
    "PacedDevice",
    "PacedTraffic",
    "SampleSource",
    "ServedRequest",
    "SimulatedFleet",
    "device_id",
    "device_tags",
    "drive_inference",
    "nan_model",
    "nan_on_live_input_model",
    "parse_drift",
    "send_labelled",
    "send_labelled_traffic",
    "shifted_model",
    "slow_model",
]
