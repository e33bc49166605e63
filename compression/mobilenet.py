"""A compute-bound benchmark model: MobileNetV2 (inverted residuals, depthwise-separable convolutions).

The reference CNN (`compression.cnn`) takes ~11 µs per inference, so call overhead hides what int8 does to
the arithmetic. This network is MobileNetV2's layout (Sandler et al. 2018, width 1.0, 3.5 M parameters, 1000
classes) on a `[batch, 3, 128, 128]` input: a millisecond of convolutions per sample, the case int8 kernels are
built for. Its weights are random (seeded): size and speed do not depend on training. Batch norm follows every
convolution, as in the trained network, so the exported graph is what a real MobileNet export looks like before
the quantizer's pre-processing folds it. torch is imported inside functions so `import compression` never
needs it.

Agreement with fp32 is no quality figure for it: an untrained network of this depth amplifies any perturbation
(noise at 35 dB below every convolution's output already changes the top class of most samples), where a
trained one is robust to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compression.data import Dataset
from compression.errors import ConverterUnavailableError
from compression.trainable import export_fixed_program, export_onnx_from_trainable

if TYPE_CHECKING:
    import torch

__all__ = ["INPUT_SHAPE", "MobileNetFiles", "build_mobilenet", "generated_images", "make_mobilenet"]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
INPUT_SHAPE = (3, 128, 128)
CLASSES = 1000
_SETTLING_IMAGES = 64

# (expansion t, output channels c, repeats n, first stride s): MobileNetV2's Table 2.
_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ConverterUnavailableError("PyTorch is not installed: pip install 'edgefleet[convert]'") from exc
    return torch


def _conv_bn(nn: Any, cin: int, cout: int, kernel: int, stride: int, *, groups: int = 1, relu: bool = True) -> Any:
    layers = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    return nn.Sequential(*layers, nn.ReLU6()) if relu else nn.Sequential(*layers)


def make_mobilenet(*, seed: int = 0, classes: int = CLASSES) -> torch.nn.Module:
    """MobileNetV2 with seeded random weights and batch-norm statistics, in eval mode."""
    torch = _torch()
    nn = torch.nn

    module_base: Any = nn.Module  # torch is imported here, not at module level: a base typed Any

    class InvertedResidual(module_base):
        def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
            super().__init__()
            hidden = cin * expansion
            expand = [_conv_bn(nn, cin, hidden, 1, 1)] if expansion != 1 else []
            self.body = nn.Sequential(
                *expand,
                _conv_bn(nn, hidden, hidden, 3, stride, groups=hidden),  # depthwise
                _conv_bn(nn, hidden, cout, 1, 1, relu=False),  # linear bottleneck
            )
            self.residual = stride == 1 and cin == cout

        def forward(self, x: Any) -> Any:
            return x + self.body(x) if self.residual else self.body(x)

    torch.manual_seed(seed)
    layers: list[Any] = [_conv_bn(nn, INPUT_SHAPE[0], 32, 3, 2)]
    channels = 32
    for expansion, cout, repeats, stride in _BLOCKS:
        for index in range(repeats):
            layers.append(InvertedResidual(channels, cout, stride if index == 0 else 1, expansion))
            channels = cout
    layers += [_conv_bn(nn, channels, 1280, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, classes)]
    model = nn.Sequential(*layers)
    _settle_batch_norm(torch, model, seed)
    return model.eval()


def _settle_batch_norm(torch: Any, model: Any, seed: int) -> None:
    """Give the random network a trained network's activation statistics.

    Untrained default initialisation shrinks activations layer after layer (every sample ends in the same class),
    which would make agreement with fp32 meaningless. So each batch norm's running statistics are measured on
    generated images (one pass in training mode, cumulative average) and its scale and shift drawn at random:
    every convolution's output is then normalised, and channels differ in range as they do after training.
    """
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.momentum = None  # cumulative average over the settling batches
        norm.weight.data.copy_(torch.rand(norm.num_features, generator=generator) * 1.5 + 0.25)
        norm.bias.data.copy_(torch.randn(norm.num_features, generator=generator) * 0.25)
    images = torch.from_numpy(generated_images(_SETTLING_IMAGES, seed=seed + 1000).x)
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), 16):
            model(images[start : start + 16])
    model.eval()


@dataclass(frozen=True)
class MobileNetFiles:
    """The exported MobileNet: fp32 ONNX (dynamic batch) and a `torch.export` program (batch 1, for LiteRT)."""

    onnx_path: Path
    program_path: Path


def build_mobilenet(out_dir: Path, *, seed: int = 0) -> MobileNetFiles:
    """Export the seeded MobileNetV2 as `mobilenet-v2.onnx` and `mobilenet-v2.pt2` into `out_dir`."""
    torch = _torch()
    model = make_mobilenet(seed=seed)
    example = torch.zeros(1, *INPUT_SHAPE)
    onnx_path = export_onnx_from_trainable(model, INPUT_NAME, OUTPUT_NAME, out_dir / "mobilenet-v2.onnx", example)
    program_path = export_fixed_program(model, example, out_dir / "mobilenet-v2.pt2")
    return MobileNetFiles(onnx_path=onnx_path, program_path=program_path)


def generated_images(count: int, *, seed: int, name: str = "generated-images") -> Dataset:
    """Unlabelled images for calibration and agreement: smooth random fields normalised as ImageNet inputs are.

    Smooth (upsampled low-resolution noise) rather than white noise, so that activation ranges look like those
    of photographs, not of static; no labels, so variants are judged by their agreement with fp32.
    """
    rng = np.random.default_rng(seed)
    channels, height, width = INPUT_SHAPE
    coarse = rng.standard_normal((count, channels, height // 8, width // 8)).astype(np.float32)
    images = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)
    images += 0.3 * rng.standard_normal(images.shape).astype(np.float32)
    return Dataset(np.ascontiguousarray(images, dtype=np.float32), None, name)
