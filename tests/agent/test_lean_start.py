"""What an agent loads to start: libraries it needs only later (a scrape, a download over httpx, sampling,
sketching a served request, WebSockets) stay out of an idle agent's memory, and still work when used."""

from __future__ import annotations

import json
import subprocess
import sys

LATER = ("httpx", "prometheus_client", "sqlite3", "datasketches", "websockets")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_an_agent_starting_its_endpoint_leaves_out_the_libraries_it_needs_only_later() -> None:
    result = _run(
        "import json, sys\n"
        "import agent.cli, agent.daemon, agent.server, agent.update, agent.telemetry, agent.transport\n"
        "import uvicorn\n"
        "assert uvicorn.Server is not None and uvicorn.Config is not None\n"
        f"print(json.dumps([m for m in {LATER!r} if m in sys.modules]))\n"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_sketches_and_metrics_load_their_libraries_when_first_used() -> None:
    result = _run(
        "import sys\n"
        "import numpy as np\n"
        "from agent.metrics import AgentMetrics, AgentReading\n"
        "from protocol import OutputSemantics, SketchSet, decode_sketch, predictions\n"
        "assert 'datasketches' not in sys.modules and 'prometheus_client' not in sys.modules\n"
        "reading = AgentReading('1', None, None, 0, 0, 'disabled', 0)\n"
        "metrics = AgentMetrics(lambda: reading)\n"
        "metrics.labels('digits', None, 2)\n"
        "body, _ = metrics.exposition(None)\n"
        "assert b'edgefleet_agent_labels_received_total{model=\"digits\"} 2.0' in body, body\n"
        "sketches = SketchSet('input')\n"
        "x = np.arange(8, dtype=np.float32).reshape(2, 4)\n"
        "semantics = OutputSemantics(kind='classifier', scores_output='p')\n"
        "sketches.update(x, predictions(semantics, {'p': np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)}))\n"
        "window = sketches.to_wire()\n"
        "assert window is not None and decode_sketch(window.features[0]).n == 2\n"
        "print('ok')\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_an_agent_that_is_not_federated_and_samples_nothing_leaves_out_those_modules() -> None:
    result = _run(
        "import json, sys\n"
        "import agent.cli, agent.daemon, agent.server, agent.metrics\n"
        "from agent.daemon import Agent\n"
        "assert Agent.federation_status.fget is not None\n"
        "print(json.dumps([m for m in ('agent.federation', 'agent.samples') if m in sys.modules]))\n"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
