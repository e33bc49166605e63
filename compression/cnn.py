"""The reference CNN: a small convolutional classifier on scikit-learn's bundled 8x8 digits.

Trained with PyTorch on the CPU in a few seconds (seeded, single-threaded, so the weights are the same
run to run), then exported three times: to ONNX (input `input` FP32 `[batch, 1, 8, 8]`, output `logits`
FP32 `[batch, 10]`) for the ONNX Runtime variants, as a `torch.export` program (`.pt2`, batch 1) for the
LiteRT conversion, and as its trainable form (`.trainable.pt2`, a dynamic batch axis; `compression.trainable`)
for federated retraining. torch is imported inside functions so `import compression` never needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compression.errors import ConverterUnavailableError
from compression.trainable import export_fixed_program, export_onnx_from_trainable, export_trainable

if TYPE_CHECKING:
    import torch

__all__ = [
    "INPUT_NAME",
    "INPUT_SHAPE",
    "OUTPUT_NAME",
    "ReferenceCNN",
    "build_reference_cnn",
    "export_onnx",
    "export_program",
    "train_digits_cnn",
]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
INPUT_SHAPE = (1, 8, 8)


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ConverterUnavailableError("PyTorch is not installed: pip install 'edgefleet[convert]'") from exc
    return torch


def _make_network() -> torch.nn.Module:
    torch = _torch()
    nn = torch.nn
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


@dataclass(frozen=True)
class ReferenceCNN:
    """Files of the trained reference CNN and its accuracy on the held-out digits."""

    onnx_path: Path
    program_path: Path
    accuracy: float
    trainable_path: Path  # the trainable form (dynamic batch axis), for federated retraining


def train_digits_cnn(*, seed: int = 0, epochs: int = 30, batch_size: int = 64) -> tuple[torch.nn.Module, float]:
    """Train the CNN on the digits training split; returns the model (eval mode) and its held-out accuracy."""
    torch = _torch()
    from compression.reference import load_digits_split

    split = load_digits_split(seed=seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: reproducible float sums, and no contention with other tests
    try:
        torch.manual_seed(seed)
        model = _make_network()
        x = torch.from_numpy(split.x_train.reshape(-1, *INPUT_SHAPE))
        y = torch.from_numpy(split.y_train)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        order = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            permutation = torch.randperm(len(x), generator=order)
            for start in range(0, len(x), batch_size):
                idx = permutation[start : start + batch_size]
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                optimizer.step()
        model.eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(split.x_test.reshape(-1, *INPUT_SHAPE)))
        accuracy = float((logits.argmax(1).numpy() == split.y_test).mean())
    finally:
        torch.set_num_threads(threads)
    return model, accuracy


def export_onnx(model: torch.nn.Module, path: Path) -> Path:
    """Export with torch's dynamo-based exporter (the default in torch 2.13) into one self-contained file."""
    torch = _torch()
    return export_onnx_from_trainable(model, INPUT_NAME, OUTPUT_NAME, path, torch.zeros(1, *INPUT_SHAPE))


def export_program(model: torch.nn.Module, path: Path) -> Path:
    """Save a `torch.export` program with a fixed batch of 1 (LiteRT models take static shapes)."""
    torch = _torch()
    return export_fixed_program(model, torch.zeros(1, *INPUT_SHAPE), path)


def build_reference_cnn(out_dir: Path, *, seed: int = 0, epochs: int = 30) -> ReferenceCNN:
    """Train the reference CNN; write `digits-cnn.onnx`, `.pt2` and `.trainable.pt2` into `out_dir`."""
    torch = _torch()
    model, accuracy = train_digits_cnn(seed=seed, epochs=epochs)
    onnx_path = export_onnx(model, out_dir / "digits-cnn.onnx")
    program_path = export_program(model, out_dir / "digits-cnn.pt2")
    trainable = export_trainable(model, torch.zeros(2, *INPUT_SHAPE), out_dir / "digits-cnn.trainable.pt2")
    return ReferenceCNN(onnx_path=onnx_path, program_path=program_path, accuracy=accuracy, trainable_path=trainable)


def predict_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """Logits of the PyTorch model on FP32 inputs (for parity checks)."""
    torch = _torch()
    with torch.no_grad():
        return np.asarray(model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy())
