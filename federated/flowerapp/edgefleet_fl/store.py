"""The device's sample store, read (never written) by the ClientApp: labelled inputs of one model, split in two.

The agent writes `<data_dir>/samples/samples.sqlite3` (docs/federated.md, "On the device"): one row per kept
example with its raw bytes, dtype and shape, and a JSON label once the application fed one back. This reader
takes the labelled rows of one model whose example shape equals the program's input, and splits them into a
training and a held-out part by a hash of `request_id` and `row`: the same row lands on the same side in every
round and every run with the same `eval-fraction`. Classification only: a label is a class index (an integer).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "STORE_FORMAT",
    "LabelledSamples",
    "SampleStoreError",
    "count_labelled",
    "held_out",
    "read_labelled",
    "split",
]

STORE_FORMAT = 1  # PRAGMA user_version of the store this reader understands


class SampleStoreError(ValueError):
    """The store is missing, of another format, or holds nothing this run can train on; the message says which."""


@dataclass(frozen=True)
class LabelledSamples:
    """Inputs `x` (`[n, *shape]`), class labels `y` (int64) and `(request_id, row)` of each, in store order."""

    x: np.ndarray
    y: np.ndarray
    keys: tuple[tuple[str, int], ...]
    skipped: int = 0  # labelled rows of the model whose shape or dtype does not fit the program

    def __len__(self) -> int:
        return len(self.y)

    def part(self, mask: np.ndarray) -> LabelledSamples:
        """The rows where `mask` is true."""
        keys = tuple(k for k, keep in zip(self.keys, mask, strict=True) if keep)
        return LabelledSamples(self.x[mask], self.y[mask], keys, self.skipped)


def held_out(request_id: str, row: int, eval_fraction: float) -> bool:
    """Whether this example belongs to the held-out part: a stable draw from its request id and row."""
    digest = hashlib.sha256(f"{request_id}\x00{row}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def split(samples: LabelledSamples, eval_fraction: float) -> tuple[LabelledSamples, LabelledSamples]:
    """(training part, held-out part)."""
    mask = np.array([held_out(rid, row, eval_fraction) for rid, row in samples.keys], dtype=bool)
    return samples.part(~mask), samples.part(mask)


def _query(path: Path, model: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of `sql` (one `?`: the model) from the store, opened read-only after checking its format."""
    if not path.is_file():
        raise SampleStoreError(f"sample store {path} does not exist (is sampling on for model {model!r}?)")
    try:
        # Read-only: the agent is the only writer. A WAL database opens read-only while the agent writes it.
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version != STORE_FORMAT:
                raise SampleStoreError(f"sample store {path} has format {version}; this app reads {STORE_FORMAT}")
            return db.execute(sql, (model,)).fetchall()
    except sqlite3.Error as exc:
        raise SampleStoreError(f"sample store {path} cannot be read: {exc}") from exc


def count_labelled(path: Path, model: str) -> int:
    """How many labelled examples of `model` the store holds (any shape)."""
    return int(_query(path, model, "SELECT COUNT(*) FROM samples WHERE model = ? AND label IS NOT NULL")[0][0])


def read_labelled(path: Path, model: str, shape: tuple[int, ...], dtype: str = "float32") -> LabelledSamples:
    """Every labelled example of `model` with this per-example `shape` and `dtype`, oldest first."""
    rows = _query(
        path,
        model,
        "SELECT request_id, row, dtype, shape, data, label FROM samples "
        "WHERE model = ? AND label IS NOT NULL ORDER BY id",
    )
    want = [int(d) for d in shape]
    xs: list[np.ndarray] = []
    ys: list[int] = []
    keys: list[tuple[str, int]] = []
    skipped = 0
    for request_id, row, row_dtype, row_shape, data, label in rows:
        if row_dtype != dtype or json.loads(row_shape) != want:
            skipped += 1
            continue
        xs.append(np.frombuffer(data, dtype=dtype).reshape(want))
        ys.append(_class_label(label, request_id, row))
        keys.append((str(request_id), int(row)))
    x = np.stack(xs) if xs else np.zeros((0, *want), dtype=dtype)
    return LabelledSamples(x, np.asarray(ys, dtype=np.int64), tuple(keys), skipped)


def _class_label(text: str, request_id: str, row: int) -> int:
    """A class index from the stored JSON label; anything else is refused (this app trains classifiers only)."""
    try:
        value = json.loads(text)
    except ValueError:
        raise SampleStoreError(f"label of request {request_id!r} row {row} is not JSON: {text!r}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SampleStoreError(
            f"label of request {request_id!r} row {row} is {text}: this app trains classifiers, a label is a "
            "class index (an integer >= 0)"
        )
    return value
