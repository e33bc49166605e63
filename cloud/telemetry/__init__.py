"""Telemetry at the coordinator: stored windows, ingest counters and the fleet summary (later: drift)."""

from cloud.telemetry.counters import IngestCounters
from cloud.telemetry.summary import DeviceSummary, FleetSummary, fleet_summary, summarise
from cloud.telemetry.windows import device_telemetry, ingest_telemetry, telemetry_totals

__all__ = [
    "DeviceSummary",
    "FleetSummary",
    "IngestCounters",
    "device_telemetry",
    "fleet_summary",
    "ingest_telemetry",
    "summarise",
    "telemetry_totals",
]
