"""Telemetry at the coordinator: stored windows (batched ingest), rollups, retention, counters, the fleet summary."""

from cloud.telemetry.counters import IngestCounters
from cloud.telemetry.ingest import Arrival, Outcome, Stored, store_windows
from cloud.telemetry.retention import prune_telemetry
from cloud.telemetry.rollups import rollup_series, rollup_totals
from cloud.telemetry.summary import DeviceSummary, FleetSummary, fleet_summary, summarise
from cloud.telemetry.windows import device_telemetry, ingest_telemetry, telemetry_totals

__all__ = [
    "Arrival",
    "DeviceSummary",
    "FleetSummary",
    "IngestCounters",
    "Outcome",
    "Stored",
    "device_telemetry",
    "fleet_summary",
    "ingest_telemetry",
    "prune_telemetry",
    "rollup_series",
    "rollup_totals",
    "store_windows",
    "summarise",
    "telemetry_totals",
]
