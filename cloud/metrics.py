"""Prometheus metrics of the coordinator (`GET /metrics`), read from its state at scrape time.

`CoordinatorMetrics` is built per app with a registry of its own (tests build many apps in one process). Its
collector takes a snapshot of the ingest counters and reads the database once per scrape (`read_fleet`, IO);
`families` turns both into metric families (pure). Labels are bounded: channels, statuses, model names and
versions, alert rules and severities, never device ids.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from sqlalchemy import func, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from cloud import __version__
from cloud.models import Device, FederatedRun, Rollout, TelemetryRecord, in_fleet
from cloud.models._common import as_utc
from cloud.models.federated import RunStatus
from cloud.rollouts.state import RolloutStatus
from cloud.services.devices import UNCONFIRMED
from protocol import DeviceStatus

if TYPE_CHECKING:
    from cloud.coordinator import Coordinator

__all__ = ["CHANNELS", "NEVER_SEEN", "CoordinatorMetrics", "FleetReading", "families", "open_alerts", "read_fleet"]

CHANNELS = ("reported", "events", "telemetry")  # always exported (0 until a message arrives)
NEVER_SEEN = "never_seen"  # the status label of a device the coordinator has never heard from
DEVICE_STATUSES = (DeviceStatus.ONLINE.value, DeviceStatus.OFFLINE.value, UNCONFIRMED, NEVER_SEEN)
_ALERT_TABLE = "alert"
_ALERT_RULE_COLUMNS = ("rule", "condition", "rule_name")


@dataclass
class FleetReading:
    """What one scrape read from the database (`ok` False: it did not answer, the rest is empty)."""

    ok: bool = True
    devices_by_status: dict[str, int] = field(default_factory=dict)
    devices_by_model: dict[tuple[str, str], int] = field(default_factory=dict)
    rollouts_by_status: dict[str, int] = field(default_factory=dict)
    runs_by_status: dict[str, int] = field(default_factory=dict)
    open_alerts: dict[tuple[str, str], int] = field(default_factory=dict)
    newest_window_end: datetime | None = None
    seconds: float = 0.0  # how long the reads took


def read_fleet(engine: Engine) -> FleetReading:
    """Read the figures of a scrape (a handful of grouped counts); `ok=False` when the database fails."""
    start = time.perf_counter()
    try:
        with Session(engine) as session:
            reading = FleetReading(
                devices_by_status=_devices_by_status(session),
                devices_by_model=_devices_by_model(session),
                rollouts_by_status=_count_by(session, Rollout.status),
                runs_by_status=_count_by(session, FederatedRun.status),
                open_alerts=open_alerts(session),
                newest_window_end=_newest_window_end(session),
            )
    except SQLAlchemyError:
        reading = FleetReading(ok=False)
    reading.seconds = time.perf_counter() - start
    return reading


def _devices_by_status(session: Session) -> dict[str, int]:
    never = col(Device.last_seen).is_(None)
    rows = session.exec(
        select(Device.status, never, func.count()).where(in_fleet()).group_by(col(Device.status), never)
    )
    counts: dict[str, int] = {}
    for status, unseen, count in rows:
        # Never heard from (enrolment pending, or enrolled but silent): neither online nor offline.
        label = NEVER_SEEN if unseen and status != DeviceStatus.ONLINE.value else status
        counts[label] = counts.get(label, 0) + int(count)
    return counts


def _devices_by_model(session: Session) -> dict[tuple[str, str], int]:
    name, version = col(Device.active_model_name), col(Device.active_model_version)
    rows = session.exec(
        select(name, version, func.count()).where(in_fleet(), name.is_not(None)).group_by(name, version)
    )
    return {(str(n), str(v or "")): int(c) for n, v, c in rows}


def _count_by(session: Session, column: Any) -> dict[str, int]:
    return {str(value): int(count) for value, count in session.exec(select(column, func.count()).group_by(column))}


def _newest_window_end(session: Session) -> datetime | None:
    # The newest stored window is the one with the highest id (the primary key's index: no scan of the table).
    newest = session.exec(select(TelemetryRecord.window_end).order_by(col(TelemetryRecord.id).desc()).limit(1))
    return as_utc(newest.first())


def open_alerts(session: Session) -> dict[tuple[str, str], int]:
    """Open alerts by rule and severity; nothing when there is no `alert` table (or it lacks those columns)."""
    inspector = inspect(session.connection())
    if not inspector.has_table(_ALERT_TABLE):
        return {}
    columns = {c["name"] for c in inspector.get_columns(_ALERT_TABLE)}
    rule = next((c for c in _ALERT_RULE_COLUMNS if c in columns), None)
    if rule is None or "severity" not in columns:
        return {}
    if "resolved_at" in columns:
        where = "resolved_at IS NULL"
    elif "status" in columns:
        where = "status = 'open'"
    elif "state" in columns:
        where = "state = 'open'"
    else:
        where = "1 = 1"
    # Column names come from the list above, never from input.
    query = text(f"SELECT {rule}, severity, COUNT(*) FROM {_ALERT_TABLE} WHERE {where} GROUP BY {rule}, severity")
    return {(str(r), str(s)): int(c) for r, s, c in session.execute(query)}


def families(
    reading: FleetReading, counters: Mapping[str, Any], *, mqtt_connected: bool | None, now: datetime
) -> list[Metric]:
    """The metric families of one scrape from what it read and the ingest counters' snapshot. Pure."""
    out: list[Metric] = list(_ingest_families(counters))
    if mqtt_connected is not None:
        out.append(_gauge("edgefleet_mqtt_connected", "1 while the MQTT bridge is connected", int(mqtt_connected)))
    out.append(_gauge("edgefleet_database_up", "1 when the database answered this scrape", int(reading.ok)))
    out.append(
        _gauge("edgefleet_metrics_database_seconds", "time the database reads of this scrape took", reading.seconds)
    )
    build = InfoMetricFamily("edgefleet_coordinator_build", "the coordinator's version")
    build.add_metric([], {"version": __version__, "python": platform.python_version()})
    out.append(build)
    if not reading.ok:
        return out
    grouped: list[tuple[str, str, list[str], Mapping[Any, float]]] = [
        ("edgefleet_devices", "devices of the fleet by connectivity", ["status"],
         _filled(reading.devices_by_status, DEVICE_STATUSES)),
        ("edgefleet_devices_by_model", "devices by the model they serve", ["model", "version"],
         reading.devices_by_model),
        ("edgefleet_rollouts", "rollouts by status", ["status"],
         _filled(reading.rollouts_by_status, [s.value for s in RolloutStatus])),
        ("edgefleet_federated_runs", "federated runs by status", ["status"],
         _filled(reading.runs_by_status, [s.value for s in RunStatus])),
        ("edgefleet_alerts_open", "open alerts by rule and severity", ["rule", "severity"], reading.open_alerts),
    ]  # fmt: skip
    out += [_by(name, documentation, labels, counts) for name, documentation, labels, counts in grouped]
    if reading.newest_window_end is not None:
        lag = max(0.0, (now - reading.newest_window_end).total_seconds())
        out.append(
            _gauge(
                "edgefleet_telemetry_ingest_lag_seconds",
                "now minus the end of the newest stored telemetry window (whole fleet)",
                lag,
            )
        )
    return out


def _ingest_families(counters: Mapping[str, Any]) -> Iterable[Metric]:
    """Per-channel counters of the MQTT ingest, and the bridge's totals (keys it lacks are left out)."""
    for key, what in (
        ("received", "received"),
        ("stored", "stored"),
        ("rejected", "rejected as malformed"),
        ("failed", "that could not be applied"),
    ):
        per_channel = counters.get(key)
        if isinstance(per_channel, Mapping):
            family = CounterMetricFamily(
                f"edgefleet_ingest_{key}", f"MQTT messages {what}, by channel", labels=["channel"]
            )
            for channel, count in sorted(_filled(per_channel, CHANNELS).items()):
                family.add_metric([channel], count)
            yield family
    for key, name, what in (
        ("duplicates_dropped", "edgefleet_ingest_duplicates", "telemetry windows dropped as already stored"),
        ("desired_published", "edgefleet_desired_published", "desired states handed to the broker"),
        ("acks_published", "edgefleet_telemetry_acks_published", "telemetry acknowledgements handed to the broker"),
        ("connects", "edgefleet_mqtt_connects", "times the MQTT bridge (re)connected"),
    ):
        if isinstance(counters.get(key), int | float):
            yield CounterMetricFamily(name, what, value=counters[key])
    if isinstance(counters.get("database_down"), bool):
        yield _gauge(
            "edgefleet_ingest_waiting_for_database",
            "1 while the bridge waits for the database",
            int(counters["database_down"]),
        )


def _filled(counts: Mapping[str, Any], always: Iterable[str]) -> dict[str, float]:
    return {**dict.fromkeys(always, 0), **{str(k): float(v) for k, v in counts.items()}}


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _by(name: str, documentation: str, labels: list[str], counts: Mapping[Any, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for key, count in sorted(counts.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], count)
    return family


class _Collector:
    """Reads the coordinator when the registry is collected (once per scrape)."""

    def __init__(self, coordinator: Coordinator, clock: Callable[[], datetime]) -> None:
        self._coordinator = coordinator
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        """The families of this scrape."""
        coordinator = self._coordinator
        bridge = coordinator.bridge
        return families(
            read_fleet(coordinator.engine),
            coordinator.counters.snapshot(),
            mqtt_connected=None if bridge is None else bridge.connected,
            now=self._clock(),
        )


class CoordinatorMetrics:
    """The coordinator's Prometheus registry (its own, never the global default) and its exposition."""

    def __init__(self, coordinator: Coordinator, *, clock: Callable[[], datetime] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(coordinator, clock or (lambda: datetime.now(UTC))))

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The scrape's body and content type: OpenMetrics when `accept` asks for it, else the text format."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
