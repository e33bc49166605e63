"""Fleets of real agents for tests, demos, load and fault injection."""

from simulators.coordinator import CoordinatorError, CoordinatorProcess
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
from simulators.traffic import DeviceTraffic, drive_inference

__all__ = [
    "MIXED_PROFILES",
    "ArtifactFaults",
    "CoordinatorError",
    "CoordinatorProcess",
    "DeviceProfile",
    "DeviceTraffic",
    "FaultyArtifactServer",
    "FleetConfig",
    "ServedRequest",
    "SimulatedFleet",
    "device_id",
    "device_tags",
    "drive_inference",
    "nan_model",
    "nan_on_live_input_model",
    "shifted_model",
    "slow_model",
]
