"""`GET /metrics` of a real agent serving the digits model in ONNX Runtime, over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import Agent
from agent.metrics import LATENCY_BUCKETS_S, AgentMetrics, AgentReading, families
from protocol.telemetry import LATENCY_BUCKETS_MS
from tests.agent.conftest import install_model, model_spec
from tests.agent.test_server import body, digits_serving, offline_config

ROWS = np.random.default_rng(11).random((2, 64), dtype=np.float32)
DIGITS = {"model": "digits", "version": "1.0"}
TOKEN = "metrics-token-for-the-tests-0123"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(exposition: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


def value(scraped: Samples, name: str, **labels: str) -> float | None:
    return scraped.get((name, frozenset(labels.items())))


@pytest.fixture
def served(tmp_path: Path, digits_model_bytes: bytes) -> Iterator[tuple[Agent, httpx.Client]]:
    """An agent serving digits 1.0 on an ephemeral port (its broker is absent: metrics must not need it)."""
    data_dir = tmp_path / "data"
    install_model(data_dir, model_spec("digits", "1.0", digits_model_bytes), digits_model_bytes)
    agent = Agent(offline_config(data_dir))
    agent.start()
    assert agent.inference_url is not None
    with httpx.Client(base_url=agent.inference_url, timeout=10) as client:
        yield agent, client
    agent.stop()


def test_inference_counts_match_the_inferences_made(served: tuple[Agent, httpx.Client]) -> None:
    agent, client = served
    for _ in range(5):
        assert client.post("/v2/models/digits/infer", json=body(ROWS)).status_code == 200
    agent.infer({"input": ROWS})  # an in-process caller is counted too
    assert client.post("/v2/models/digits/infer", json=body(ROWS, name="pixels")).status_code == 400  # never ran
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    scraped = samples(response.text)
    assert value(scraped, "edgefleet_agent_inferences_total", **DIGITS) == 6
    assert value(scraped, "edgefleet_agent_inference_errors_total", **DIGITS) == 0
    assert value(scraped, "edgefleet_agent_inference_latency_seconds_count", **DIGITS) == 6
    assert value(scraped, "edgefleet_agent_inference_latency_seconds_bucket", le="+Inf", **DIGITS) == 6
    latency_sum = value(scraped, "edgefleet_agent_inference_latency_seconds_sum", **DIGITS)
    assert latency_sum is not None and 0 < latency_sum < 6 * 5.0
    sha = agent.active_model.sha256 if agent.active_model else ""
    assert value(scraped, "edgefleet_agent_model_info", sha256=sha, **DIGITS) == 1
    assert value(scraped, "edgefleet_agent_update_phase", phase="idle") == 1
    assert value(scraped, "edgefleet_agent_update_phase", phase="downloading") == 0
    assert value(scraped, "edgefleet_agent_supernode_up") == 0
    assert value(scraped, "edgefleet_agent_supernode_state", state="disabled") == 1
    assert value(scraped, "edgefleet_agent_telemetry_unconfirmed_windows") == 0
    assert value(scraped, "edgefleet_agent_telemetry_dropped_windows_total") == 0


def test_openmetrics_is_served_when_asked_for(served: tuple[Agent, httpx.Client]) -> None:
    _, client = served
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def test_metrics_off_leaves_no_route(tmp_path: Path) -> None:
    agent = Agent(offline_config(tmp_path / "data", metrics=False))
    agent.start()
    try:
        assert agent.inference_url is not None
        assert httpx.get(f"{agent.inference_url}/metrics", timeout=10).status_code == 404
    finally:
        agent.stop()


def test_with_an_endpoint_token_a_scrape_needs_it(tmp_path: Path) -> None:
    agent = Agent(offline_config(tmp_path / "data", http_token=TOKEN))
    agent.start()
    try:
        url = f"{agent.inference_url}/metrics"
        assert httpx.get(url, timeout=10).status_code == 401
        scraped = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert scraped.status_code == 200
        assert value(samples(scraped.text), "edgefleet_agent_model_loaded") == 0  # no model installed
    finally:
        agent.stop()


def test_a_runtime_failure_is_an_error_of_that_model(tmp_path: Path, digits_model_bytes: bytes) -> None:
    active = digits_serving(tmp_path, digits_model_bytes).current()
    assert active is not None
    metrics = AgentMetrics(lambda: _reading())
    metrics.tap(active, {"input": ROWS}, None, 3.0)  # what `Serving` reports when the runtime raised
    metrics.tap(active, {"input": ROWS}, active.model.infer({"input": ROWS}), 0.4)
    scraped = samples(metrics.exposition(None)[0].decode())
    assert value(scraped, "edgefleet_agent_inferences_total", **DIGITS) == 2
    assert value(scraped, "edgefleet_agent_inference_errors_total", **DIGITS) == 1
    assert value(scraped, "edgefleet_agent_inference_latency_seconds_bucket", le="0.0005", **DIGITS) == 1
    assert value(scraped, "edgefleet_agent_inference_latency_seconds_bucket", le="0.003", **DIGITS) == 2


def test_latency_buckets_are_the_telemetry_buckets_in_seconds() -> None:
    assert [round(b * 1000, 6) for b in LATENCY_BUCKETS_S] == list(LATENCY_BUCKETS_MS)


def test_an_unknown_phase_or_state_is_still_reported() -> None:
    exported = families(_reading(update_phase="from-a-newer-agent", supernode_state="odd"))
    phases = next(f for f in exported if f.name == "edgefleet_agent_update_phase")
    assert {s.labels["phase"]: s.value for s in phases.samples}["from-a-newer-agent"] == 1
    assert sum(s.value for s in phases.samples) == 1


def _reading(**changes: object) -> AgentReading:
    fields: dict[str, object] = {
        "version": "0.1.0",
        "model": None,
        "update_phase": "idle",
        "telemetry_unconfirmed": 0,
        "telemetry_dropped": 0,
        "supernode_state": "disabled",
        "rejected_messages": 0,
    }
    fields.update(changes)
    return AgentReading(**fields)  # type: ignore[arg-type]
