"""Prometheus metrics of one agent, served at `GET /metrics` on its local endpoint.

Every agent has a registry of its own (a simulated fleet runs many agents in one process). Inferences are
read at scrape time like everything else: the agent's telemetry recorder already counts them, in batches, off
the caller's path (`served`, `agent.windows.ServedCounts`; a Prometheus counter and histogram updated per call
cost ~4 µs, as much as a small model's inference). `AgentMetrics.tap` counts calls handed to it directly (a
serving tap, for a `Serving` without that recorder). Everything else is read from the agent when it is scraped
(`AgentReading`, from a callable).
Labels fed back for earlier predictions (`agent.feedback`) are counted as they arrive: received (counted into
telemetry) and refused, by reason (`unknown_id`, `duplicate`, `wrong_kind`, `malformed`, `stale_version`).
Labels are bounded: model name and version, update phase, SuperNode state, refusal reason.

prometheus_client (with http.server, wsgiref and friends, ~1 MiB resident) is imported on the first scrape or the
first label fed back, not by an agent nobody scrapes.
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, get_args

import numpy as np

from agent._federation_status import State
from agent.windows import ServedCounts
from protocol import ModelRef, UpdatePhase
from protocol.telemetry import LATENCY_BUCKETS_MS

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter
    from prometheus_client.core import GaugeMetricFamily, Metric

    from agent.serving import ActiveModel

__all__ = [
    "LABEL_REFUSALS",
    "LATENCY_BUCKETS_S",
    "SUPERNODE_STATES",
    "AgentMetrics",
    "AgentReading",
    "families",
    "served_families",
]

LATENCY_BUCKETS_S: tuple[float, ...] = tuple(bound / 1000.0 for bound in LATENCY_BUCKETS_MS)
SUPERNODE_STATES: tuple[str, ...] = get_args(State)  # of `agent.federation.FederationStatus`
# Why a label fed back was not counted (`agent.errors.FeedbackError.reason`, and a label of a retired version).
LABEL_REFUSALS: tuple[str, ...] = ("unknown_id", "duplicate", "wrong_kind", "malformed", "stale_version")
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
    from prometheus_client.core import CounterMetricFamily, InfoMetricFamily

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
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, documentation, value=value)


def _one_of(name: str, documentation: str, label: str, values: Iterable[str], current: str) -> GaugeMetricFamily:
    """An enum as a gauge: one series per value, 1 for `current` (added when it is not a known value)."""
    from prometheus_client.core import GaugeMetricFamily

    family = GaugeMetricFamily(name, documentation, labels=[label])
    known = list(values)
    for value in known if current in known else [*known, current]:
        family.add_metric([value], int(value == current))
    return family


ServedReading = Callable[[], Mapping[tuple[str, str], ServedCounts]]


def served_families(served: Mapping[tuple[str, str], ServedCounts]) -> list[Metric]:
    """Inferences, runtime failures and the latency histogram by model and version. Pure."""
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
    from prometheus_client.utils import floatToGoString

    labels = ["model", "version"]
    inferences = CounterMetricFamily("edgefleet_agent_inferences", "inferences run, by model", labels=labels)
    errors = CounterMetricFamily(
        "edgefleet_agent_inference_errors", "inferences the runtime failed, by model", labels=labels
    )
    latency = HistogramMetricFamily(
        "edgefleet_agent_inference_latency_seconds", "inference latency, by model", labels=labels
    )
    bounds = [*(floatToGoString(b) for b in LATENCY_BUCKETS_S), "+Inf"]
    for (model, version), counts in sorted(served.items()):
        inferences.add_metric([model, version], counts.inferences)
        errors.add_metric([model, version], counts.errors)  # the series exists (at 0) from a model's first inference
        cumulative = list(itertools.accumulate(counts.histogram))
        latency.add_metric([model, version], list(zip(bounds, cumulative, strict=True)), counts.latency_sum_ms / 1000.0)
    return [inferences, errors, latency]


class _ReadingCollector:
    def __init__(self, read: Callable[[], AgentReading], served: Callable[[], list[Metric]]) -> None:
        self._read = read
        self._served = served

    def collect(self) -> Iterable[Metric]:
        return [*self._served(), *families(self._read())]


class AgentMetrics:
    """The agent's registry: inference counters filled by `tap`, the rest read by `read()` at scrape time."""

    def __init__(self, read: Callable[[], AgentReading], served: ServedReading | None = None) -> None:
        self._read = read
        self._served = served
        self._tapped: dict[tuple[str, str], ServedCounts] = {}
        self._tap_lock = threading.Lock()
        self._registry: tuple[CollectorRegistry, Counter, Counter] | None = None
        self._registry_lock = threading.Lock()

    @property
    def registry(self) -> CollectorRegistry:
        """The Prometheus registry, made (and prometheus_client imported) on first use."""
        return self._made()[0]

    def _made(self) -> tuple[CollectorRegistry, Counter, Counter]:
        with self._registry_lock:
            if self._registry is None:
                self._registry = self._make()
            return self._registry

    def _make(self) -> tuple[CollectorRegistry, Counter, Counter]:
        from prometheus_client import CollectorRegistry, Counter

        registry = CollectorRegistry(auto_describe=False)
        received = Counter(
            "edgefleet_agent_labels_received",
            "labels fed back for earlier predictions and counted in telemetry, by model (one per row)",
            ["model"],
            registry=registry,
        )
        refused = Counter(
            "edgefleet_agent_labels_refused",
            "labels fed back and not counted, by model and reason (unknown_id, duplicate, wrong_kind, malformed: "
            "per refused body item; stale_version: per row)",
            ["model", "reason"],
            registry=registry,
        )
        registry.register(_ReadingCollector(self._read, self._served_families))
        return registry, received, refused

    def _served_families(self) -> list[Metric]:
        served = dict(self._served()) if self._served is not None else {}
        with self._tap_lock:
            for key, tapped in self._tapped.items():
                counts = served.setdefault(key, ServedCounts())
                served[key] = ServedCounts(
                    inferences=counts.inferences + tapped.inferences,
                    errors=counts.errors + tapped.errors,
                    histogram=[a + b for a, b in zip(counts.histogram, tapped.histogram, strict=True)],
                    latency_sum_ms=counts.latency_sum_ms + tapped.latency_sum_ms,
                )
        return served_families(served)

    def labels(self, model: str, reason: str | None, n: int) -> None:
        """Count `n` labels fed back for `model`: received (`reason` None) or refused for `reason`."""
        _, received, refused = self._made()
        if reason is None:
            received.labels(model).inc(n)
        else:
            refused.labels(model, reason if reason in LABEL_REFUSALS else "malformed").inc(n)

    def tap(
        self,
        active: ActiveModel,
        _inputs: Mapping[str, np.ndarray],
        outputs: dict[str, np.ndarray] | None,
        latency_ms: float,
    ) -> None:
        """Count one inference that ran (`outputs` None: the runtime failed); an `agent.serving.InferenceTap`."""
        with self._tap_lock:
            counts = self._tapped.setdefault((active.spec.name, active.spec.version), ServedCounts())
            counts.inferences += 1
            counts.errors += outputs is None
            counts.histogram[bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)] += 1
            counts.latency_sum_ms += latency_ms

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The scrape's body and content type: OpenMetrics when `accept` asks for it, else the text format."""
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
