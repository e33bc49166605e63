"""Prometheus metrics of one agent, served at `GET /metrics` on its local endpoint.

Every agent has a registry of its own (a simulated fleet runs many agents in one process). Inferences are
counted as they happen through a serving tap (`AgentMetrics.tap`, on the caller's thread: a few counter
increments); everything else is read from the agent when it is scraped (`AgentReading`, from a callable).
Labels are bounded: model name and version, update phase, SuperNode state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, get_args

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from agent.federation import State
from protocol import ModelRef, UpdatePhase
from protocol.telemetry import LATENCY_BUCKETS_MS

if TYPE_CHECKING:
    from agent.serving import ActiveModel

__all__ = ["LATENCY_BUCKETS_S", "SUPERNODE_STATES", "AgentMetrics", "AgentReading", "families"]

LATENCY_BUCKETS_S: tuple[float, ...] = tuple(bound / 1000.0 for bound in LATENCY_BUCKETS_MS)
SUPERNODE_STATES: tuple[str, ...] = get_args(State)  # of `agent.federation.FederationStatus`
# Phases an agent reports today (`warming_up` is an older agent's name of `health_check`).
_PHASES = tuple(p.value for p in UpdatePhase if p is not UpdatePhase.WARMING_UP)


@dataclass(frozen=True)
class AgentReading:
    """What a scrape reads from the agent."""

    version: str
    model: ModelRef | None
    update_phase: str | None  # None before the update worker exists
    telemetry_unconfirmed: int  # windows in the outbox, waiting for the coordinator's acknowledgement
    telemetry_dropped: int  # windows dropped for good (outbox full)
    supernode_state: str  # `disabled` unless federated
    rejected_messages: int


def families(reading: AgentReading) -> list[Metric]:
    """The scrape-time metric families of `reading`. Pure."""
    build = InfoMetricFamily("edgefleet_agent_build", "the agent's version")
    build.add_metric([], {"version": reading.version})
    out: list[Metric] = [build]
    model = InfoMetricFamily("edgefleet_agent_model", "the model being served (no series before one is loaded)")
    if reading.model is not None:
        model.add_metric([], {"model": reading.model.name, "version": reading.model.version,
                              "sha256": reading.model.sha256})  # fmt: skip
    out.append(model)
    out.append(_gauge("edgefleet_agent_model_loaded", "1 while a model is served", int(reading.model is not None)))
    if reading.update_phase is not None:
        out.append(_one_of("edgefleet_agent_update_phase", "the update path's phase (1 for the current one)",
                           "phase", _PHASES, reading.update_phase))  # fmt: skip
    out.append(_gauge("edgefleet_agent_telemetry_unconfirmed_windows",
                      "telemetry windows kept on disk until the coordinator confirms them",
                      reading.telemetry_unconfirmed))  # fmt: skip
    out.append(CounterMetricFamily("edgefleet_agent_telemetry_dropped_windows",
                                   "telemetry windows dropped for good (outbox full)",
                                   value=reading.telemetry_dropped))  # fmt: skip
    out.append(_gauge("edgefleet_agent_supernode_up", "1 while the Flower SuperNode runs",
                      int(reading.supernode_state == "running")))  # fmt: skip
    out.append(_one_of("edgefleet_agent_supernode_state", "the Flower SuperNode's state (1 for the current one)",
                       "state", SUPERNODE_STATES, reading.supernode_state))  # fmt: skip
    out.append(CounterMetricFamily("edgefleet_agent_rejected_messages", "malformed MQTT messages dropped",
                                   value=reading.rejected_messages))  # fmt: skip
    return out


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _one_of(name: str, documentation: str, label: str, values: Iterable[str], current: str) -> GaugeMetricFamily:
    """An enum as a gauge: one series per value, 1 for `current` (added when it is not a known value)."""
    family = GaugeMetricFamily(name, documentation, labels=[label])
    known = list(values)
    for value in known if current in known else [*known, current]:
        family.add_metric([value], int(value == current))
    return family


class _ReadingCollector:
    def __init__(self, read: Callable[[], AgentReading]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        return families(self._read())


class AgentMetrics:
    """The agent's registry: inference counters filled by `tap`, the rest read by `read()` at scrape time."""

    def __init__(self, read: Callable[[], AgentReading]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        labels = ["model", "version"]
        self._inferences = Counter(
            "edgefleet_agent_inferences", "inferences run, by model", labels, registry=self.registry
        )
        self._errors = Counter(
            "edgefleet_agent_inference_errors",
            "inferences the runtime failed, by model",
            labels,
            registry=self.registry,
        )
        self._latency = Histogram(
            "edgefleet_agent_inference_latency_seconds",
            "inference latency, by model",
            labels,
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.registry.register(_ReadingCollector(read))

    def tap(
        self,
        active: ActiveModel,
        _inputs: Mapping[str, np.ndarray],
        outputs: dict[str, np.ndarray] | None,
        latency_ms: float,
    ) -> None:
        """Count one inference that ran (`outputs` None: the runtime failed); an `agent.serving.InferenceTap`."""
        labels = (active.spec.name, active.spec.version)
        self._inferences.labels(*labels).inc()
        errors = self._errors.labels(*labels)  # the series exists (at 0) from a model's first inference
        if outputs is None:
            errors.inc()
        self._latency.labels(*labels).observe(latency_ms / 1000.0)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The scrape's body and content type: OpenMetrics when `accept` asks for it, else the text format."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
