"""Fleets of real agents for tests, demos, load and fault injection."""

from simulators.coordinator import CoordinatorClient, CoordinatorError, CoordinatorProcess
from simulators.fleet import FleetConfig, SimulatedFleet, device_id, device_tags
from simulators.traffic import DeviceTraffic, drive_inference

__all__ = [
    "CoordinatorClient",
    "CoordinatorError",
    "CoordinatorProcess",
    "DeviceTraffic",
    "FleetConfig",
    "SimulatedFleet",
    "device_id",
    "device_tags",
    "drive_inference",
]
