"""Agent benchmark: every figure is a ratio against a baseline measured in the same run.

(a) in-process inference: `Agent.infer` (telemetry and drift sketches on, as shipped) vs raw
    `InferenceSession.run`, same model and inputs, interleaved rounds; wall time and the calling thread's CPU time
    (on a shared machine the wall figure also holds the time other processes took the core);
(b) the local Open Inference Protocol endpoint vs a bare Starlette app on uvicorn returning the same
    payload: requests/s and p50/p99 latency, load from a separate process over loopback;
(c) the agent daemon's resident memory, idle with the demo model loaded, vs a bare Python process that
    has loaded the same model into onnxruntime.

Run: `.venv/bin/python benchmarks/bench_agent.py` (about a minute); `--memory` runs (c) alone, `--runs N` times
interleaved (the median is printed); `--memory --breakdown` adds where the agent's memory goes: the resident size of
a fresh interpreter after each layer of libraries the idle agent loads, in the order it loads them (a module shared
by two layers counts in the first).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import Agent, AgentConfig
from benchmarks._setup import TOPIC_BASE, embedded_broker, publish_desired, rss_kib
from compression.reference import load_digits_split, train_digits_mlp
from simulators.faults import FaultyArtifactServer
from simulators.traffic import oip_request

ROUNDS, CALLS_PER_ROUND = 20, 2000
HTTP_REQUESTS, HTTP_CONCURRENCY = 2000, 4

LOAD_SCRIPT = r"""
import json, sys, time, threading, httpx
url, body, total, concurrency = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
latencies, lock = [], threading.Lock()
def worker(n):
    with httpx.Client(timeout=10) as client:
        client.post(url, json=body).raise_for_status()  # warm-up
        for _ in range(n):
            t = time.perf_counter(); client.post(url, json=body).raise_for_status(); dt = time.perf_counter() - t
            with lock: latencies.append(dt)
threads = [threading.Thread(target=worker, args=(total // concurrency,)) for _ in range(concurrency)]
start = time.perf_counter()
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"elapsed": time.perf_counter() - start, "latencies": latencies}))
"""


def in_process_overhead(agent: Agent, model_path: Path, x: np.ndarray) -> dict[str, tuple[float, float, float]]:
    """Median per-call seconds of raw `session.run`, of `Agent.infer` and of the C++ binding `run` wraps (which the
    agent calls), interleaved to share the noise: wall time, and the calling thread's CPU time (what the call
    costs, without the time other processes took the core)."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    binding, names = session._sess, [o.name for o in session.get_outputs()]  # what `run` wraps (see agent.runtime)
    wall: dict[str, list[float]] = {"raw": [], "agent": [], "binding": []}
    cpu: dict[str, list[float]] = {"raw": [], "agent": [], "binding": []}
    for r in range(ROUNDS):
        samples = [x[(r * CALLS_PER_ROUND + i) % len(x)][np.newaxis] for i in range(CALLS_PER_ROUND)]
        for name, call in (
            ("raw", lambda s: session.run(None, {"input": s})),
            ("agent", lambda s: agent.infer({"input": s})),
            ("binding", lambda s: binding.run(names, {"input": s}, None)),
        ):
            start, start_cpu = time.perf_counter(), time.thread_time()
            for s in samples:
                call(s)
            cpu[name].append((time.thread_time() - start_cpu) / CALLS_PER_ROUND)
            wall[name].append((time.perf_counter() - start) / CALLS_PER_ROUND)
    return {
        clock: (statistics.median(times["raw"]), statistics.median(times["agent"]), statistics.median(times["binding"]))
        for clock, times in (("wall", wall), ("cpu", cpu))
    }


def run_load(url: str, body: dict[str, object]) -> dict[str, float]:
    """Drive `url` from a separate process; returns requests/s, p50 and p99 in ms."""
    out = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, url, json.dumps(body), str(HTTP_REQUESTS), str(HTTP_CONCURRENCY)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    result = json.loads(out.stdout)
    lat = sorted(result["latencies"])
    return {
        "rps": len(lat) / result["elapsed"],
        "p50_ms": 1000 * lat[len(lat) // 2],
        "p99_ms": 1000 * lat[int(len(lat) * 0.99) - 1],
    }


def bare_starlette(payload: bytes) -> tuple[str, uvicorn.Server, threading.Thread]:
    """A bare Starlette endpoint on uvicorn that returns `payload` for every POST."""

    async def infer(request: Request) -> Response:
        await request.body()
        return Response(payload, media_type="application/json")

    app = Starlette(routes=[Route("/infer", infer, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}/infer", server, thread


def daemon_rss(tmp: Path, broker_url: str, artifact_url: str, model_path: Path, run: int = 0) -> int:
    """RSS (KiB) of `edgefleet-agent run`, idle, after it activated the model (a fresh device and data dir per run)."""
    device = f"bench-rss-{run}"
    config = tmp / f"{device}.toml"
    data_dir = tmp / f"{device}-data"
    config.write_text(
        f'device_id = "{device}"\ndata_dir = "{data_dir}"\nmqtt_url = "{broker_url}"\n'
        f'topic_base = "{TOPIC_BASE}"\nhttp_port = 0\ntelemetry_interval_s = 3600\n'
    )
    publish_desired(broker_url, device, model_path, artifact_url, "1.0.0")
    agent_bin = Path(sys.executable).parent / "edgefleet-agent"
    proc = subprocess.Popen(
        [str(agent_bin), "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        state = data_dir / "slots" / "active"
        deadline = time.monotonic() + 60
        while not state.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3.0)  # idle: let the update finish and allocations settle
        return rss_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(15)


def baseline_rss(model_path: Path) -> int:
    """RSS (KiB) of a bare Python process that loaded the model into onnxruntime."""
    script = (
        "import onnxruntime as ort, numpy as np, time, sys\n"
        "o = ort.SessionOptions(); o.intra_op_num_threads = 1\n"
        f"s = ort.InferenceSession({str(model_path)!r}, o, providers=['CPUExecutionProvider'])\n"
        "s.run(None, {'input': np.zeros((1, 64), np.float32)})\n"
        "print('ready', flush=True); time.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        time.sleep(3.0)
        return rss_kib(proc.pid)
    finally:
        proc.kill()
        proc.wait()


# Layers of an idle `edgefleet-agent run`, cumulative: each adds the modules named (and what they import).
MEMORY_LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("numpy + onnxruntime (as the baseline)", ("numpy", "onnxruntime")),
    ("hashlib + ssl (libcrypto, libssl)", ("hashlib", "ssl")),
    ("pydantic", ("pydantic",)),
    ("importlib.metadata (pydantic plugins)", ("importlib.metadata", "email.message", "zipfile")),
    ("protocol (its pydantic models)", ("protocol", "protocol.inference", "protocol.telemetry", "protocol.mqtt")),
    ("paho-mqtt + urllib (MQTT, downloads)", ("paho.mqtt.client", "urllib.request")),
    ("starlette + anyio + asyncio", ("starlette.applications", "starlette.routing", "starlette.responses")),
    ("uvicorn (click, logging.config, h11)", ("uvicorn", "uvicorn.protocols.http.h11_impl", "uvicorn.loops.auto")),
    ("agent's own modules", ("agent.cli", "agent.daemon")),
)
BREAKDOWN_SCRIPT = r"""
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
sizes = [rss()]
for modules in json.loads(sys.argv[2]):
    for name in modules:
        importlib.import_module(name)
    sizes.append(rss())
print(json.dumps(sizes))
"""


def import_layers_kib() -> list[int]:
    """RSS (KiB) of a fresh interpreter, bare and after each of `MEMORY_LAYERS` in turn."""
    layers = json.dumps([modules for _, modules in MEMORY_LAYERS])
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", BREAKDOWN_SCRIPT, root, layers], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"memory breakdown failed: {out.stderr.strip()}")
    sizes: list[int] = json.loads(out.stdout)
    return sizes


def print_breakdown(layers: list[list[int]], rss_base: float, rss_agent: float) -> None:
    """Median size after each layer and what it adds; the rest is the session, threads and state at runtime."""
    medians = [statistics.median(run[i] for run in layers) for i in range(len(MEMORY_LAYERS) + 1)]
    print(f"    where it goes (fresh interpreter, cumulative imports, median of {len(layers)})")
    print(f"      {'python':40s} {medians[0] / 1024:6.1f} MiB")
    for (name, _), before, after in zip(MEMORY_LAYERS, medians[:-1], medians[1:], strict=True):
        print(f"      + {name:38s} {after / 1024:6.1f} MiB  {(after - before) / 1024:+5.1f}")
    session = rss_base - medians[1]
    runtime = rss_agent - medians[-1]
    extra = (runtime - session) / 1024
    print(f"      {'baseline: session and first run':40s} {session / 1024:+13.1f} (bare process)")
    label = "agent at runtime: session, threads, ..."
    print(f"      {label:40s} {runtime / 1024:+13.1f} ({extra:+.1f} over the baseline's)")


def memory_only(runs: int, breakdown: bool = False) -> None:
    """Part (c) alone: agent and bare process measured alternately, `runs` times each (and the import layers)."""
    agent_kib: list[int] = []
    base_kib: list[int] = []
    layers: list[list[int]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_path = tmp / "digits.onnx"
        model_path.write_bytes(train_digits_mlp().onnx_bytes)
        with embedded_broker() as broker_url, FaultyArtifactServer() as artifacts:
            artifact_url = artifacts.publish(model_path.name, model_path.read_bytes())
            for run in range(runs):
                base_kib.append(baseline_rss(model_path))
                agent_kib.append(daemon_rss(tmp, broker_url, artifact_url, model_path, run))
                if breakdown:
                    layers.append(import_layers_kib())
    rss_base, rss_agent = statistics.median(base_kib), statistics.median(agent_kib)

    def each(kib: list[int]) -> str:
        return " ".join(f"{k / 1024:.1f}" for k in kib)

    print(f"(c) resident memory, idle with the model loaded, median of {runs} interleaved runs")
    print(f"    bare python + onnxruntime  {rss_base / 1024:8.1f} MiB   ({each(base_kib)})")
    ratio = rss_agent / rss_base
    print(f"    edgefleet-agent run        {rss_agent / 1024:8.1f} MiB   ({each(agent_kib)})   ratio {ratio:5.2f}x")
    if breakdown:
        print_breakdown(layers, rss_base, rss_agent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--memory", action="store_true", help="run only part (c), resident memory")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs for --memory (default 3)")
    parser.add_argument("--breakdown", action="store_true", help="with --memory: the resident size of each layer")
    args = parser.parse_args()
    if args.memory:
        memory_only(max(args.runs, 1), breakdown=args.breakdown)
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_path = tmp / "digits.onnx"
        model_path.write_bytes(train_digits_mlp().onnx_bytes)
        x = load_digits_split().x_test
        with embedded_broker() as broker_url, FaultyArtifactServer() as artifacts:
            artifact_url = artifacts.publish(model_path.name, model_path.read_bytes())  # served without faults
            publish_desired(broker_url, "bench-1", model_path, artifact_url, "1.0.0")
            config = AgentConfig(
                device_id="bench-1",
                data_dir=tmp / "agent",
                mqtt_url=broker_url,
                topic_base=TOPIC_BASE,
                http_port=0,
                telemetry_interval_s=3600,
            )
            with Agent(config) as agent:
                if not agent.wait_for_model("1.0.0", timeout=60):
                    raise SystemExit("agent did not activate the model")
                deadline = time.monotonic() + 60  # measure the committed model, not its trial period
                while (status := agent.update_status) is None or status.phase != "active":
                    if time.monotonic() > deadline:
                        raise SystemExit(f"the update did not commit: {status}")
                    time.sleep(0.1)
                overhead = in_process_overhead(agent, model_path, x)

                body = oip_request("input", x[0])
                endpoint = f"{agent.inference_url}/v2/models/digits/infer"
                payload = httpx.post(endpoint, json=body).content
                bare_url, server, thread = bare_starlette(payload)
                try:
                    bare = run_load(bare_url, body)
                    agent_http = run_load(endpoint, body)
                finally:
                    server.should_exit = True
                    thread.join(10)
            rss_agent = daemon_rss(tmp, broker_url, artifact_url, model_path)
        rss_base = baseline_rss(model_path)

    print(f"machine: {os.cpu_count()} CPUs; model: digits MLP (64→32→10), batch 1, intra-op threads 1")
    print(f"(a) in-process inference, median of {ROUNDS}x{CALLS_PER_ROUND} interleaved calls")
    for clock, (raw_s, agent_s, binding_s) in overhead.items():
        print(f"    raw InferenceSession.run   {raw_s * 1e6:8.1f} µs/call ({clock})")
        print(
            f"    Agent.infer                {agent_s * 1e6:8.1f} µs/call ({clock})   ratio {agent_s / raw_s:5.2f}x"
            f"   overhead {(agent_s - raw_s) * 1e6:6.1f} µs"
        )
        print(
            f"    (C++ binding under run     {binding_s * 1e6:8.1f} µs/call ({clock}): Agent.infer "
            f"{agent_s / binding_s:5.2f}x of it)"
        )
    print(f"(b) HTTP, {HTTP_REQUESTS} requests, {HTTP_CONCURRENCY} connections, load from a separate process")
    print(
        f"    bare Starlette/uvicorn     {bare['rps']:8.0f} req/s  p50 {bare['p50_ms']:6.2f} ms"
        f"  p99 {bare['p99_ms']:6.2f} ms"
    )
    print(
        f"    agent OIP endpoint         {agent_http['rps']:8.0f} req/s  p50 {agent_http['p50_ms']:6.2f} ms"
        f"  p99 {agent_http['p99_ms']:6.2f} ms"
    )
    print(
        f"    ratio agent/bare           rps {agent_http['rps'] / bare['rps']:5.2f}x  "
        f"p50 {agent_http['p50_ms'] / bare['p50_ms']:5.2f}x  p99 {agent_http['p99_ms'] / bare['p99_ms']:5.2f}x"
    )
    print("(c) resident memory, idle with the model loaded")
    print(f"    bare python + onnxruntime  {rss_base / 1024:8.1f} MiB")
    print(f"    edgefleet-agent run        {rss_agent / 1024:8.1f} MiB   ratio {rss_agent / rss_base:5.2f}x")


if __name__ == "__main__":
    main()
