"""Data sets for calibration and evaluation: `.npz`, `.npy` or `.csv` files, or built-in names.

| source                 | inputs `x`                        | labels / targets `y`                         |
|------------------------|-----------------------------------|----------------------------------------------|
| `.npz`                 | array `x`                         | array `y` (class ids, or regression targets) |
| `.npy`                 | the array (first axis = samples)  | none: variants are judged against fp32 alone |
| `.csv`                 | every column but the label column | a column headed `label`, `y` or `target`     |
| `digits`, `digits-train`, `digits-constant` | scikit-learn's bundled digits | their classes           |

A `.csv` has one sample per row, numbers only, and an optional header row; without a label column (or
without a header) every column is an input. Anything else is refused with what was expected.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compression.errors import InvalidInputError

__all__ = ["BUILTIN_DATASETS", "Dataset", "fixed_batches", "load_dataset"]

BUILTIN_DATASETS = ("digits", "digits-train", "digits-constant")
LABEL_COLUMNS = ("label", "y", "target")
EXPECTED = (
    "an .npz file with arrays x (inputs) and y (labels or targets), an .npy file of inputs only, "
    f"a .csv file (one sample per row; a header column named {', '.join(LABEL_COLUMNS)} holds the labels), "
    f"or one of {', '.join(BUILTIN_DATASETS)}"
)


@dataclass(frozen=True)
class Dataset:
    """Inputs `x` (FP32, first axis = samples) and labels or targets `y` (None: inputs only)."""

    x: np.ndarray
    y: np.ndarray | None = None
    name: str = "data"

    def __post_init__(self) -> None:
        if self.x.ndim == 0 or len(self.x) == 0:
            raise InvalidInputError(f"{self.name}: no samples")
        if self.y is not None and len(self.x) != len(self.y):
            raise InvalidInputError(f"{self.name}: {len(self.x)} inputs but {len(self.y)} labels")

    @property
    def labelled(self) -> bool:
        """True when the data carries labels (classifiers) or targets (regressors)."""
        return self.y is not None

    def __len__(self) -> int:
        return len(self.x)

    def shaped(self, sample_shape: tuple[int, ...]) -> np.ndarray:
        """The inputs as FP32 `[n, *sample_shape]`, e.g. flat 64-pixel digits as `[n, 1, 8, 8]`."""
        per_sample = int(np.prod(sample_shape))
        if self.x[0].size != per_sample:
            hint = "; pass data of your own with --eval and --calibration" if self.name in BUILTIN_DATASETS else ""
            raise InvalidInputError(
                f"{self.name}: a sample has {self.x[0].size} values but the model takes {sample_shape}{hint}"
            )
        return np.ascontiguousarray(self.x.reshape((len(self.x), *sample_shape)), dtype=np.float32)

    def head(self, n: int) -> Dataset:
        """The first `n` samples (calibration rarely needs more than a few hundred)."""
        return Dataset(self.x[:n], None if self.y is None else self.y[:n], self.name)


def fixed_batches(x: np.ndarray, batch: int) -> Iterator[tuple[np.ndarray, int]]:
    """`(chunk, rows)`: `x` in chunks of exactly `batch` samples for a model with a fixed batch; the last chunk
    is padded by repeating its final sample (harmless to calibration ranges), `rows` says how many are real."""
    for start in range(0, len(x), batch):
        chunk = x[start : start + batch]
        rows = len(chunk)
        if rows < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - rows, axis=0)])
        yield chunk, rows


def load_dataset(spec: str | Path) -> Dataset:
    """Load a built-in data set or an `.npz`, `.npy` or `.csv` file; `InvalidInputError` says what was expected."""
    text = str(spec)
    if text in BUILTIN_DATASETS:
        return _builtin(text)
    path = Path(text)
    if not path.is_file():
        raise InvalidInputError(f"data {text!r} is neither a file nor one of {', '.join(BUILTIN_DATASETS)}")
    readers = {".npz": _read_npz, ".npy": _read_npy, ".csv": _read_csv}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise InvalidInputError(f"{path}: unsupported data file; expected {EXPECTED}")
    return reader(path)


def _numeric(path: Path, array: np.ndarray, what: str) -> np.ndarray:
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise InvalidInputError(f"{path}: {what} must be numbers, got an array of {array.dtype}")
    return array


def _read_npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = sorted(npz.files)
            if not {"x", "y"} <= set(names):
                raise InvalidInputError(
                    f"{path}: an .npz data file needs arrays 'x' and 'y' (inputs, and labels or targets); it has "
                    f"{names or 'none'} (inputs without labels: save them as .npy)"
                )
            x, y = npz["x"], npz["y"]
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{path}: not a readable .npz file ({exc})") from exc
    x, y = _numeric(path, x, "inputs x"), _numeric(path, y, "labels y")
    return Dataset(np.asarray(x, dtype=np.float32), _labels(y), path.name)


def _read_npy(path: Path) -> Dataset:
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{path}: not a readable .npy file of numbers ({exc})") from exc
    if not isinstance(x, np.ndarray):
        raise InvalidInputError(f"{path}: not an .npy array file; expected {EXPECTED}")
    return Dataset(np.asarray(_numeric(path, x, "inputs"), dtype=np.float32), None, path.name)


def _read_csv(path: Path) -> Dataset:
    try:
        with path.open(newline="") as handle:
            rows = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInputError(f"{path}: not a readable .csv file ({exc})") from exc
    if not rows:
        raise InvalidInputError(f"{path}: no samples")
    header = None if all(_is_number(cell) for cell in rows[0]) else [cell.strip() for cell in rows[0]]
    first = 1 if header is None else 2  # the line number of the first sample (blank lines aside)
    body = rows[first - 1 :]
    width = len(rows[0])
    values = np.empty((len(body), width), dtype=np.float64)
    for index, row in enumerate(body):
        if len(row) != width:
            raise InvalidInputError(f"{path}: row {index + first} has {len(row)} values, the first row {width}")
        bad = next((cell for cell in row if not _is_number(cell)), None)
        if bad is not None:
            raise InvalidInputError(f"{path}: row {index + first}: {bad!r} is not a number")
        values[index] = [float(cell) for cell in row]
    if len(values) == 0:
        raise InvalidInputError(f"{path}: a header but no samples")
    label = next((i for i, name in enumerate(header or []) if name.lower() in LABEL_COLUMNS), None)
    if label is None:
        return Dataset(values.astype(np.float32), None, path.name)
    x = np.delete(values, label, axis=1).astype(np.float32)
    return Dataset(x, _labels(values[:, label]), path.name)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _labels(y: np.ndarray) -> np.ndarray:
    """Class ids as int64 when every value is a whole number, else the targets as FP32 (a regressor's)."""
    y = np.asarray(y)
    if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        return y.astype(np.int64)
    if np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return y.astype(np.int64)
    return y.astype(np.float32)


def _builtin(name: str) -> Dataset:
    from compression.reference import load_digits_split

    split = load_digits_split()
    if name == "digits":
        return Dataset(split.x_test, split.y_test, name)
    if name == "digits-constant":
        # Deliberately useless calibration data: every pixel the same, so activation ranges collapse.
        return Dataset(np.zeros_like(split.x_train), split.y_train, name)
    return Dataset(split.x_train, split.y_train, name)
