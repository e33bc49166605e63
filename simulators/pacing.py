"""Steady inference traffic: `rps` requests per second to every serving device, on absolute deadlines.

One scheduler thread keeps each device's next deadline (start + phase + k / rps) in a heap and hands due
requests to a small pool of sender threads. Deadlines are absolute, so the time a request takes never
slows the rate down (sleeping 1/rps after each request would, and a loop that sends a burst and then
sleeps delivers a fraction of what was asked). A device more than `max_lag_s` behind (a stalled endpoint,
an overloaded machine) skips its missed slots instead of bursting them, and counts them as `skipped`.
"""

from __future__ import annotations

import dataclasses
import heapq
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np

from agent import Agent
from simulators.drift import Drift, drifts_for
from simulators.traffic import DeviceTraffic, SampleSource, predict

__all__ = ["PacedDevice", "PacedTraffic"]


@dataclass
class PacedDevice(DeviceTraffic):
    """One device's share of paced traffic: answered requests (`sent`), and slots that sent nothing."""

    skipped: int = 0  # slots dropped because the device (or the senders) fell more than max_lag_s behind
    idle: int = 0  # slots while the device served no model


class PacedTraffic:
    """Requests at `rps` per device to every agent serving a model, from a background thread, until stopped.

    Each device draws random held-out digits from its own `SampleSource` (seeded by `seed` and its place in
    `agents`), drifted by the `drifts` its tags match. Use as a context manager, or `start()` / `stop()`.
    """

    def __init__(
        self,
        agents: Sequence[Agent],
        rps: float,
        *,
        drifts: Sequence[Drift] = (),
        seed: int = 0,
        senders: int | None = None,
        max_lag_s: float = 1.0,
    ) -> None:
        if rps <= 0:
            raise ValueError(f"rps must be positive, got {rps}")
        self.rps = rps
        self.max_lag_s = max_lag_s
        self._agents = list(agents)
        self._drifts = tuple(drifts)
        self._seed = seed
        self._senders = senders or min(16, max(2, len(self._agents)))
        self._stats = {a.config.device_id: PacedDevice(a.config.device_id) for a in self._agents}
        self._sources: dict[int, tuple[object, SampleSource]] = {}
        self._lock = threading.Lock()
        self._pending = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._client: httpx.Client | None = None
        self.started_at: float | None = None

    def __enter__(self) -> PacedTraffic:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start sending (the first slot of each device falls within the first 1/rps seconds)."""
        connections = self._senders * 2
        self._client = httpx.Client(timeout=10.0, limits=httpx.Limits(max_connections=connections))
        self._pool = ThreadPoolExecutor(self._senders, thread_name_prefix="edgefleet-traffic")
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="edgefleet-traffic", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop scheduling, wait for the requests under way, close the connections."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._client is not None:
            self._client.close()

    def stats(self) -> dict[str, PacedDevice]:
        """A copy of every device's counters so far."""
        with self._lock:
            return {device_id: dataclasses.replace(s) for device_id, s in self._stats.items()}

    def answered_rate(self) -> float:
        """Requests answered without error per second, over the whole fleet, since `start()`."""
        if self.started_at is None:
            return 0.0
        elapsed = max(time.monotonic() - self.started_at, 1e-9)
        return sum(s.sent - s.errors for s in self.stats().values()) / elapsed

    # -- the scheduler ----------------------------------------------------------------------------

    def _run(self) -> None:
        period = 1.0 / self.rps
        assert self.started_at is not None
        count = len(self._agents)
        # Devices are spread evenly over the first period, so the fleet's requests do not all fall together.
        heap = [(self.started_at + period * i / max(count, 1), i) for i in range(count)]
        heapq.heapify(heap)
        while heap and not self._stopping.is_set():
            deadline, index = heap[0]
            delay = deadline - time.monotonic()
            if delay > 0 and self._stopping.wait(delay):
                break
            heapq.heappop(heap)
            late = time.monotonic() - deadline
            if late > self.max_lag_s:
                missed = int(late / period)
                self._count(index, skipped=missed)
                deadline += missed * period
            self._dispatch(index)
            heapq.heappush(heap, (deadline + period, index))

    def _count(self, index: int, **counts: int) -> None:
        with self._lock:
            stats = self._stats[self._agents[index].config.device_id]
            for name, n in counts.items():
                setattr(stats, name, getattr(stats, name) + n)

    def _dispatch(self, index: int) -> None:
        """Hand one request of device `index` to a sender (drawn here: a device's generator has one user)."""
        agent = self._agents[index]
        model, active = agent.loaded_model, agent.active_model
        if model is None or active is None:
            self._count(index, idle=1)
            return
        with self._lock:
            if self._pending >= self._senders * 4:  # the senders cannot keep up: drop, do not queue without end
                self._stats[agent.config.device_id].skipped += 1
                return
            self._pending += 1
        spec = model.inputs[0]
        sample, label = self._source(index, (active, spec.name, tuple(spec.shape)), spec.shape).draw()
        assert self._pool is not None
        self._pool.submit(self._send, index, active.name, spec.name, sample, label)

    def _source(self, index: int, key: object, shape: Sequence[int]) -> SampleSource:
        """The device's sample source, made again when it serves another model (another input shape)."""
        known = self._sources.get(index)
        if known is None or known[0] != key:
            drifts = drifts_for(self._drifts, self._agents[index].config.tags)
            known = (key, SampleSource(shape, drifts=drifts, seed=self._seed * 1_000_003 + index))
            self._sources[index] = known
        return known[1]

    def _send(self, index: int, name: str, input_name: str, sample: np.ndarray, label: int) -> None:
        agent = self._agents[index]
        assert self._client is not None
        try:
            predicted = predict(agent, self._client, agent.inference_url, name, input_name, sample)
        except Exception:  # a refused request (mid-switch, stopping agent) is counted, never kills the sender
            self._count(index, sent=1, errors=1)
        else:
            self._count(index, sent=1, correct=int(predicted == label))
        finally:
            with self._lock:
                self._pending -= 1
