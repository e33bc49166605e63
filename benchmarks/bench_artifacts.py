"""Artifact downloads through the coordinator's route against a bare Starlette FileResponse, in one process run.

Three uvicorn servers on loopback, in threads of this process, serve the same 20 MB file:

(a) `bare`: a Starlette app whose only route is `FileResponse(path)` (the baseline: the fastest the stack goes);
(b) `route`: the coordinator's `/api/v1/artifacts/{sha256}` (auth check, 1 MiB reads, ETag = sha256);
(c) `route_64k`: the same route with Starlette's default 64 KiB reads (what the route did before).

Each downloads `--downloads` times (whole file, one client, streamed and discarded), then the same with
`Range: bytes=<half>-` (a resume). Prints JSON: MB/s per server and the ratio to `bare` measured in this run.
The machine is shared: compare ratios, not absolute figures.

    python benchmarks/bench_artifacts.py [--downloads 10] [--mb 20]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from cloud.api.artifacts import ArtifactFileResponse
from cloud.app import create_app
from cloud.settings import Settings
from simulators.brokers import free_port


@contextmanager
def serving(app: ASGIApp) -> Iterator[str]:
    """`app` on a free loopback port in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def bare_app(path: Path) -> Starlette:
    """The baseline: one route, Starlette's FileResponse, nothing else."""

    async def artifact(_request: Request) -> FileResponse:
        return FileResponse(path, media_type="application/octet-stream")

    return Starlette(routes=[Route("/artifact", artifact)])


def mb_per_s(client: httpx.Client, url: str, downloads: int, size: int, headers: dict[str, str]) -> float:
    """Mean throughput of `downloads` streamed GETs of `url` (bytes counted, not kept)."""
    received = 0
    start = time.perf_counter()
    for _ in range(downloads):
        with client.stream("GET", url, headers=headers) as response:
            response.raise_for_status()
            for chunk in response.iter_raw():
                received += len(chunk)
    elapsed = time.perf_counter() - start
    first = int(headers["Range"].removeprefix("bytes=").rstrip("-")) if "Range" in headers else 0
    expected = downloads * (size - first)
    if received != expected:
        raise RuntimeError(f"{url}: received {received} bytes, expected {expected}")
    return received / elapsed / 1e6


def _with_64k_reads(client: httpx.Client, url: str, headers: dict[str, str], size: int, extra: dict[str, str]) -> float:
    """One download through the route with Starlette's default 64 KiB reads (the route before 1 MiB reads)."""
    chosen = ArtifactFileResponse.chunk_size
    ArtifactFileResponse.chunk_size = FileResponse.chunk_size
    try:
        return mb_per_s(client, url, 1, size, {**headers, **extra})
    finally:
        ArtifactFileResponse.chunk_size = chosen


def run(downloads: int, megabytes: int) -> dict[str, object]:
    """Measure the three servers, whole and resumed; returns the figures and ratios to `bare`."""
    with tempfile.TemporaryDirectory(prefix="bench-artifacts-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        settings = Settings(data_dir=root / "coordinator", port=0, alert_tick_s=0, ct_tick_s=0, drift_rollup_tick_s=0)
        app = create_app(settings, enable_mqtt=False)
        blob = root / "model.bin"
        blob.write_bytes(os.urandom(megabytes * 1024 * 1024))
        size = blob.stat().st_size
        route_url = stack.enter_context(serving(app))
        coordinator = app.state.coordinator
        with blob.open("rb") as stream:
            sha256, _ = coordinator.store.put(stream)
        bare_url = stack.enter_context(serving(bare_app(coordinator.store.path(sha256))))
        client = stack.enter_context(httpx.Client(timeout=60))
        auth = {"Authorization": f"Bearer {coordinator.admin_token}"}
        targets = {"bare": (f"{bare_url}/artifact", {}), "route": (f"{route_url}/api/v1/artifacts/{sha256}", auth)}
        results: dict[str, dict[str, float]] = {}
        for label, ranged in (("whole", False), ("resume_half", True)):
            extra = {"Range": f"bytes={size // 2}-"} if ranged else {}
            for url, headers in targets.values():
                mb_per_s(client, url, 1, size, {**headers, **extra})  # warm: page cache, connection, imports
            # Interleaved one download at a time, so a neighbour's burst on the shared cores hits all three alike.
            seconds = dict.fromkeys([*targets, "route_64k"], 0.0)
            for _ in range(downloads):
                for name, (url, headers) in targets.items():
                    seconds[name] += 1 / mb_per_s(client, url, 1, size, {**headers, **extra})
                seconds["route_64k"] += 1 / _with_64k_reads(client, *targets["route"], size, extra)
            results[label] = {name: downloads / total for name, total in seconds.items()}
    return {
        "downloads": downloads,
        "megabytes": megabytes,
        "mb_per_s": {label: {k: round(v, 1) for k, v in row.items()} for label, row in results.items()},
        "ratio_to_bare": {
            label: {k: round(v / row["bare"], 2) for k, v in row.items() if k != "bare"}
            for label, row in results.items()
        },
    }


def main() -> None:
    """Parse arguments, run, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--downloads", type=int, default=10)
    parser.add_argument("--mb", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(run(args.downloads, args.mb), indent=2))


if __name__ == "__main__":
    main()
