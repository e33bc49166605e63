"""Local training and evaluation of the trainable module (torch; classification with cross-entropy).

The module comes from a torch.export program: it trains like any module, but `.train()`/`.eval()` raise, and
dropout/batch-norm keep the (eval-mode) behaviour they were exported with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["TrainConfig", "evaluate", "load_arrays", "state_arrays", "train"]

EVAL_CHUNK = 1024  # rows per forward pass when evaluating (the program's batch axis stops at 4096)


@dataclass(frozen=True)
class TrainConfig:
    """How one node trains in one round."""

    epochs: int
    lr: float
    batch_size: int
    optimizer: str  # "sgd" (momentum 0.9) or "adam"
    proximal_mu: float = 0.0  # FedProx: mu/2 * ||w - w_global||^2 added to the loss; 0 = plain FedAvg
    seed: int = 0


def load_arrays(module: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """Put the received weights into the module; a missing, extra or misshapen array is refused by name."""
    import torch

    current = module.state_dict()
    missing = sorted(set(current) - set(arrays))
    extra = sorted(set(arrays) - set(current))
    wrong = [n for n in current if n in arrays and tuple(arrays[n].shape) != tuple(current[n].shape)]
    if missing or extra or wrong:
        raise ValueError(f"the received weights do not fit the model: missing {missing}, extra {extra}, shape {wrong}")
    state = {n: torch.from_numpy(np.array(arrays[n], copy=True)).to(current[n].dtype) for n in current}
    module.load_state_dict(state, strict=True)


def state_arrays(module: Any) -> dict[str, np.ndarray]:
    """The module's weights as numpy arrays by parameter name."""
    return {name: t.detach().cpu().numpy().copy() for name, t in module.state_dict().items()}


def train(module: Any, x: np.ndarray, y: np.ndarray, config: TrainConfig) -> float:
    """Train in place for `config.epochs`; returns the mean cross-entropy of the last epoch."""
    import torch

    torch.manual_seed(config.seed)
    inputs, labels = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
    params = [p for p in module.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if config.proximal_mu > 0 else []
    if config.optimizer == "adam":
        optimizer: Any = torch.optim.Adam(params, lr=config.lr)
    else:
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9)
    order = torch.Generator().manual_seed(config.seed)
    epoch_loss = 0.0
    for _ in range(config.epochs):
        permutation = torch.randperm(len(inputs), generator=order)
        total, seen = 0.0, 0
        for start in range(0, len(inputs), config.batch_size):
            idx = permutation[start : start + config.batch_size]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(module(inputs[idx]), labels[idx])
            objective = loss
            if anchor:
                proximal = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                objective = loss + config.proximal_mu / 2 * proximal
            objective.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        epoch_loss = total / max(seen, 1)
    return epoch_loss


def evaluate(module: Any, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on labelled rows."""
    import torch

    with torch.no_grad():
        logits = torch.cat(
            [
                module(torch.from_numpy(np.ascontiguousarray(x[i : i + EVAL_CHUNK])))
                for i in range(0, len(x), EVAL_CHUNK)
            ]
        )
        labels = torch.from_numpy(y)
        loss = torch.nn.functional.cross_entropy(logits, labels).item()
        accuracy = (logits.argmax(1) == labels).float().mean().item()
    return float(loss), float(accuracy)
