"""Labelled data sets for calibration and evaluation: `.npz` files with `x` and `y`, or built-in names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compression.errors import InvalidInputError

__all__ = ["BUILTIN_DATASETS", "Dataset", "load_dataset"]

BUILTIN_DATASETS = ("digits", "digits-train", "digits-constant")


@dataclass(frozen=True)
class Dataset:
    """Inputs `x` (FP32, first axis = samples) and integer labels `y`."""

    x: np.ndarray
    y: np.ndarray
    name: str = "data"

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise InvalidInputError(f"{self.name}: {len(self.x)} inputs but {len(self.y)} labels")
        if len(self.x) == 0:
            raise InvalidInputError(f"{self.name}: no samples")

    def __len__(self) -> int:
        return len(self.x)

    def shaped(self, sample_shape: tuple[int, ...]) -> np.ndarray:
        """The inputs as FP32 `[n, *sample_shape]`, e.g. flat 64-pixel digits as `[n, 1, 8, 8]`."""
        per_sample = int(np.prod(sample_shape))
        if self.x[0].size != per_sample:
            raise InvalidInputError(
                f"{self.name}: a sample has {self.x[0].size} values but the model takes {sample_shape}"
            )
        return np.ascontiguousarray(self.x.reshape((len(self.x), *sample_shape)), dtype=np.float32)

    def head(self, n: int) -> Dataset:
        """The first `n` samples (calibration rarely needs more than a few hundred)."""
        return Dataset(self.x[:n], self.y[:n], self.name)


def load_dataset(spec: str | Path) -> Dataset:
    """Load `digits` (held-out split), `digits-train` (training split), `digits-constant` or an `.npz` file."""
    text = str(spec)
    if text in BUILTIN_DATASETS:
        return _builtin(text)
    path = Path(text)
    if not path.is_file():
        raise InvalidInputError(f"data {text!r} is neither a file nor one of {', '.join(BUILTIN_DATASETS)}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            x, y = npz["x"], npz["y"]
    except KeyError as exc:
        raise InvalidInputError(f"{path}: an .npz data file needs arrays 'x' and 'y'") from exc
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{path}: not a readable .npz file ({exc})") from exc
    return Dataset(np.asarray(x, dtype=np.float32), np.asarray(y).astype(np.int64), path.name)


def _builtin(name: str) -> Dataset:
    from compression.reference import load_digits_split

    split = load_digits_split()
    if name == "digits":
        return Dataset(split.x_test, split.y_test, name)
    if name == "digits-constant":
        # Deliberately useless calibration data: every pixel the same, so activation ranges collapse.
        return Dataset(np.zeros_like(split.x_train), split.y_train, name)
    return Dataset(split.x_train, split.y_train, name)
