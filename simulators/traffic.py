"""Inference traffic for a simulated fleet: held-out digits sent to each device's local endpoint.

Every request carries a row drawn at random from the held-out split (`SampleSource`), so a device's traffic
has the data's real class mix rather than one sample replayed; a device matching a `--drift` sees its
rows drifted. `simulators.pacing` sends them at a steady rate; `drive_inference` sends a fixed number.
`send_labelled_traffic` plants training data on a device that samples its requests (federated retraining):
inference requests with ids, then their labels through the device's labels endpoint.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from agent import Agent
from agent.runtime import datatype_of
from compression.reference import DigitsSplit, load_digits_split
from simulators.drift import Drift

__all__ = [
    "DeviceTraffic",
    "LabelledTraffic",
    "SampleSource",
    "digits_samples",
    "drive_inference",
    "oip_request",
    "predict",
    "send_labelled",
    "send_labelled_traffic",
]


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


# -- labelled traffic (federated retraining) ----------------------------------------------------------------


@dataclass
class LabelledTraffic:
    """What `send_labelled` sent to one device and what its sample store took."""

    url: str
    requests: int = 0
    rows: int = 0
    stored: int = 0  # rows the device labelled (only kept requests are: its sample rate decides)
    unknown: list[str] = field(default_factory=list)  # request ids the device did not keep
    ids: list[str] = field(default_factory=list)


def send_labelled(
    url: str,
    model: str,
    input_name: str,
    inputs: np.ndarray,
    labels: Sequence[int | float] | np.ndarray,
    *,
    batch: int = 16,
    token: str | None = None,
    id_prefix: str | None = None,
    timeout_s: float = 30.0,
) -> LabelledTraffic:
    """Infer `inputs` (first axis = rows) at `url` in batches with ids, then send each row's label back.

    `RuntimeError` with the device's answer when a request is refused (the model, the token, the body).
    """
    if len(inputs) != len(labels):
        raise ValueError(f"{len(inputs)} input rows but {len(labels)} labels")
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    prefix = id_prefix or uuid.uuid4().hex[:12]
    headers = {"authorization": f"Bearer {token}"} if token else {}
    datatype = datatype_of(inputs.dtype).value
    traffic = LabelledTraffic(url=url)
    entries: list[dict[str, object]] = []
    with httpx.Client(base_url=url, timeout=timeout_s, headers=headers) as client:
        for start in range(0, len(inputs), batch):
            rows, row_labels = inputs[start : start + batch], labels[start : start + batch]
            request_id = f"{prefix}-{start // batch}"
            body = {
                "id": request_id,
                "inputs": [
                    {"name": input_name, "shape": list(rows.shape), "datatype": datatype, "data": rows.ravel().tolist()}
                ],
            }
            answer = _checked(client.post(f"/v2/models/{model}/infer", json=body))
            traffic.ids.append(str(answer.get("id", request_id)))
            traffic.requests += 1
            traffic.rows += len(rows)
            values = [_plain(v) for v in row_labels]
            entries.append({"id": traffic.ids[-1], "label": values if len(values) > 1 else values[0]})
        for start in range(0, len(entries), 500):  # a few hundred labels per body keeps it well under the limit
            result = _checked(client.post(f"/v2/models/{model}/labels", json={"labels": entries[start : start + 500]}))
            traffic.stored += int(result["stored"])
            traffic.unknown += [str(i) for i in result["unknown"]]
    return traffic


def send_labelled_traffic(
    agent: Agent, inputs: np.ndarray, labels: Sequence[int | float] | np.ndarray, *, batch: int = 16
) -> int:
    """Plant labelled samples on a running agent through its endpoint (served model, its token); rows stored."""
    active, model, url = agent.active_model, agent.loaded_model, agent.inference_url
    if active is None or model is None or url is None:
        raise RuntimeError(f"agent {agent.config.device_id} serves no model on a local endpoint")
    traffic = send_labelled(
        url, active.name, model.inputs[0].name, inputs, labels, batch=batch, token=agent.config.http_token
    )
    return traffic.stored


def _checked(response: httpx.Response) -> dict[str, Any]:
    if response.status_code != 200:
        raise RuntimeError(f"{response.request.url.path}: {response.status_code}: {response.text[:500]}")
    body: dict[str, Any] = response.json()
    return body


def _plain(value: object) -> int | float:
    """A label as JSON wants it: numpy integers to int, numpy floats to float."""
    if isinstance(value, np.integer | int) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, np.floating | float):
        return float(value)
    raise ValueError(f"label {value!r} is not an int class index or a float value")
