"""The model (the reference CNN's architecture), the node's data and the training loop, as in the spike's app."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

torch.set_num_threads(1)


def net() -> nn.Module:
    """The reference CNN's layers (compression/cnn.py), seeded."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def load_data(path: str) -> dict[str, torch.Tensor]:
    """The node's .npz: x_train, y_train, x_eval, y_eval."""
    with np.load(path) as data:
        return {k: torch.from_numpy(np.ascontiguousarray(data[k])) for k in ("x_train", "y_train", "x_eval", "y_eval")}


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch: int, seed: int) -> float:
    """SGD with momentum 0.9 (as edgefleet's app); the mean cross-entropy of the last epoch."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    order = torch.Generator().manual_seed(seed)
    model.train()
    mean = 0.0
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=order)
        total = 0.0
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        mean = total / max(len(x), 1)
    return mean


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(loss, accuracy)."""
    model.eval()
    with torch.no_grad():
        out = model(x)
        return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def process_age() -> float:
    """Seconds since this process started."""
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    return max(0.0, uptime - start / os.sysconf("SC_CLK_TCK"))


def now() -> float:
    """A monotonic clock."""
    return time.perf_counter()
