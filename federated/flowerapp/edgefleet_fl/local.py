"""One node's part of a round, without Flower types: its data, the model with the received weights, the work.

Shared by the Message-API ClientApp and the SecAgg+ (legacy API) client, which differ only in how weights and
metrics travel. Failures raise with a message that names the device and the cause; Flower turns them into an
error reply the ServerApp logs and counts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .program import load_program, program_bytes
from .settings import RunSettings
from .store import LabelledSamples, SampleStoreError, count_labelled, read_labelled, split
from .training import TrainConfig, evaluate, load_arrays, state_arrays, train

__all__ = ["LocalRun", "process_age"]


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc), to measure the cost of a fresh ClientApp process."""
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class LocalRun:
    """The model (with the weights of this round) and this node's labelled samples, split."""

    module: Any
    train_part: LabelledSamples
    held_part: LabelledSamples
    timings: dict[str, float]

    @classmethod
    def prepare(
        cls,
        node_config: Mapping[str, Any],
        settings: RunSettings,
        arrays: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    ) -> LocalRun:
        """Check the store has enough labelled rows (before paying for torch), load the program, read the rows.

        `arrays` are the received weights by parameter name, or as a list in the module's state-dict order
        (Flower's legacy API, which SecAgg+ runs on, carries no names).
        """
        started = time.perf_counter()
        timings = {"time-process-start-s": process_age() or 0.0}
        store, device = _store(node_config), str(node_config.get("device-id", "this device"))
        labelled = count_labelled(store, settings.model)
        if labelled < settings.min_samples:
            raise SampleStoreError(
                f"{device} has {labelled} labelled samples of model {settings.model!r}, fewer than the run's "
                f"min-samples {settings.min_samples}"
            )
        module, shape = load_program(program_bytes())
        timings["time-load-s"] = time.perf_counter() - started
        samples = read_labelled(store, settings.model, shape)
        if len(samples) < settings.min_samples:
            raise SampleStoreError(
                f"{device} has {len(samples)} labelled samples of model {settings.model!r} shaped {list(shape)} "
                f"(float32), fewer than the run's min-samples {settings.min_samples} ({samples.skipped} labelled "
                "rows have another shape or dtype)"
            )
        load_arrays(module, arrays if isinstance(arrays, Mapping) else _named(module, arrays))
        _check_classes(module, samples, device)
        train_part, held_part = split(samples, settings.eval_fraction)
        return cls(module, train_part, held_part, timings)

    def fit(
        self, settings: RunSettings, *, server_round: int, proximal_mu: float
    ) -> tuple[dict[str, np.ndarray], float]:
        """Train on the training part; (new weights, last epoch's loss)."""
        if not len(self.train_part):
            raise SampleStoreError("no labelled samples are left for training after holding out eval-fraction")
        started = time.perf_counter()
        config = TrainConfig(
            epochs=settings.local_epochs,
            lr=settings.lr,
            batch_size=settings.batch_size,
            optimizer=settings.optimizer,
            proximal_mu=proximal_mu,
            seed=server_round,
        )
        loss = train(self.module, self.train_part.x, self.train_part.y, config)
        self.timings["time-train-s"] = time.perf_counter() - started
        return state_arrays(self.module), loss

    def check(self) -> tuple[float, float]:
        """(loss, accuracy) on the held-out part."""
        if not len(self.held_part):
            raise SampleStoreError(
                f"no held-out samples: none of the {len(self.train_part)} labelled rows fell in the eval-fraction; "
                "label more rows or raise eval-fraction"
            )
        return evaluate(self.module, self.held_part.x, self.held_part.y)


def _named(module: Any, arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    names = list(module.state_dict())
    if len(names) != len(arrays):
        raise ValueError(f"received {len(arrays)} arrays, but the model has {len(names)} weights")
    return dict(zip(names, arrays, strict=True))


def _store(node_config: Mapping[str, Any]) -> Path:
    path = str(node_config.get("sample-store", "")).strip()
    if not path:
        raise SampleStoreError(
            "this SuperNode was started without a sample store: --node-config 'sample-store=\"<path>\"' "
            "(the agent passes it when sampling is on)"
        )
    return Path(path)


def _check_classes(module: Any, samples: LabelledSamples, device: str) -> None:
    """Refuse labels the model has no class for (cross-entropy would fail with a less helpful message)."""
    import torch

    with torch.no_grad():
        classes = int(module(torch.from_numpy(np.ascontiguousarray(samples.x[:1]))).shape[-1])
    if int(samples.y.max()) >= classes:
        raise SampleStoreError(
            f"{device}: a label is {int(samples.y.max())}, but the model has {classes} classes (0..{classes - 1})"
        )
