"""Inference traffic for a simulated fleet: held-out digits sent to each device's local endpoint.

Every request carries a row drawn at random from the held-out split (`SampleSource`), so a device's traffic
has the data's real class mix rather than one sample replayed; a device matching a `--drift` sees its
rows drifted. `simulators.pacing` sends them at a steady rate; `drive_inference` sends a fixed number.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np

from agent import Agent
from compression.reference import DigitsSplit, load_digits_split
from simulators.drift import Drift

__all__ = ["DeviceTraffic", "SampleSource", "digits_samples", "drive_inference", "oip_request", "predict"]


@dataclass
class DeviceTraffic:
    """What was sent to one device and how it answered."""

    device_id: str
    sent: int = 0
    errors: int = 0
    correct: int = 0

    @property
    def accuracy(self) -> float:
        """Share of answered requests whose predicted class was right."""
        answered = self.sent - self.errors
        return self.correct / answered if answered else 0.0


@functools.lru_cache(maxsize=1)
def _held_out() -> DigitsSplit:
    # Loaded once per process: every device of a fleet, every round of `edgefleet sim`, uses the same split.
    return load_digits_split()


def digits_samples(shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Held-out digits shaped for a model input of `shape` (batch dimension first)."""
    split = _held_out()
    per_sample = [d if d > 0 else 1 for d in shape[1:]]
    return split.x_test.reshape([-1, *per_sample]).astype(np.float32), split.y_test


class SampleSource:
    """Held-out digits drawn at random (with replacement), one per request, drifted as the device's drifts say.

    Not thread-safe (one numpy generator): one source per device, drawn from one thread.
    """

    def __init__(self, shape: Sequence[int], *, drifts: Sequence[Drift] = (), seed: int | None = None) -> None:
        split = _held_out()
        self._rows = split.x_test.astype(np.float32)
        self._labels = split.y_test
        self._shape = [d if d > 0 else 1 for d in shape[1:]]
        self._drifts = tuple(drifts)
        self._rng = np.random.default_rng(seed)

    def draw(self) -> tuple[np.ndarray, int]:
        """One sample shaped for the model input (no batch dimension) and its true label."""
        index = int(self._rng.integers(len(self._labels)))
        row = self._rows[index : index + 1]
        for drift in self._drifts:
            row = drift.apply(row, self._rng)
        return row.reshape(self._shape), int(self._labels[index])


def oip_request(input_name: str, sample: np.ndarray) -> dict[str, object]:
    """An Open Inference Protocol request body for one sample."""
    batch = sample[np.newaxis]
    return {
        "inputs": [{"name": input_name, "shape": list(batch.shape), "datatype": "FP32", "data": batch.ravel().tolist()}]
    }


def _drive_one(agent: Agent, requests: int, seed: int) -> DeviceTraffic:
    traffic = DeviceTraffic(agent.config.device_id)
    model = agent.loaded_model
    active = agent.active_model
    if model is None or active is None:
        traffic.sent, traffic.errors = requests, requests
        return traffic
    spec = model.inputs[0]
    source = SampleSource(spec.shape, seed=seed)
    url = agent.inference_url
    with httpx.Client(timeout=10.0) as client:
        for _ in range(requests):
            sample, label = source.draw()
            traffic.sent += 1
            try:
                predicted = predict(agent, client, url, active.name, spec.name, sample)
            except (httpx.HTTPError, RuntimeError):
                traffic.errors += 1
                continue
            traffic.correct += int(predicted == label)
    return traffic


def predict(agent: Agent, client: httpx.Client, url: str | None, name: str, input_name: str, sample: np.ndarray) -> int:
    """The class the agent predicts for `sample`: over its local endpoint at `url`, or in process without one."""
    if url is None:  # no local endpoint: call the agent in process (the same code path the endpoint uses)
        outputs = agent.infer({input_name: sample[np.newaxis]})
        return int(np.argmax(next(iter(outputs.values()))[0]))
    response = client.post(f"{url}/v2/models/{name}/infer", json=oip_request(input_name, sample))
    if response.status_code != 200:
        raise RuntimeError(f"{response.status_code}: {response.text}")
    first = response.json()["outputs"][0]
    return int(np.argmax(first["data"]))


def drive_inference(
    agents: Sequence[Agent],
    requests_per_device: int,
    *,
    workers: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> list[DeviceTraffic]:
    """Send `requests_per_device` random held-out digits to every agent (a few at a time); per-device results."""
    results: list[DeviceTraffic] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_drive_one, agent, requests_per_device, i) for i, agent in enumerate(agents)]
        for done, future in enumerate(futures, start=1):
            results.append(future.result())
            if progress:
                progress(done, len(futures))
    return results
