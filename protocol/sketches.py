"""Mergeable per-window sketches of a model's inputs and confidence (KLL quantile sketches, Apache DataSketches).

A device sketches every row it serves: each input value when a row has at most `MAX_DIRECT_FEATURES` of them
("direct"), else `PROJECTIONS` "chunk-means" (the flattened row split by `np.array_split` into contiguous chunks,
the mean of each: deterministic, nothing to ship to the device). Beside them: the top-1 probability, the
top1 - top2 margin (classifiers) and the predicted values (regressors). Windows merge into fleet or period
distributions on the coordinator, and the same sketches over evaluation data make reference profiles.

Sketches travel as base64 of the DataSketches KLL serialization. `decode_sketch` checks every header field, the
level layout and the sample weights against the format before the C++ library reads a byte: the coordinator
decodes what devices send, and the library itself crashes on some malformed inputs.
"""

from __future__ import annotations

import base64
import binascii
import functools
import itertools
import struct
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.errors import ProtocolError

if TYPE_CHECKING:
    from datasketches import kll_floats_sketch

    from protocol.outputs import Predictions

__all__ = [
    "MAX_DIRECT_FEATURES",
    "MAX_SKETCH_BYTES",
    "MAX_SKETCH_K",
    "PROJECTIONS",
    "SKETCH_K",
    "FeatureMode",
    "SketchError",
    "SketchSet",
    "WindowSketches",
    "decode_sketch",
    "encode_sketch",
    "feature_matrix",
]

# KLL k: normalized rank error about 1.33 % (single-sided, 99 % confidence; `get_normalized_rank_error(200,
# False)`), about 2.2 KB serialized after 10,000 values and growing only with log(n).
SKETCH_K = 200
MAX_DIRECT_FEATURES = 16
PROJECTIONS = 8
# What a decoded sketch may be: k up to 4,096 (the library's default is 200) and this many bytes serialized.
MAX_SKETCH_K = 4096
MAX_SKETCH_BYTES = 96 * 1024
_MAX_SKETCH_CHARS = (MAX_SKETCH_BYTES + 2) // 3 * 4

FeatureMode = Literal["direct", "chunk-means"]
# One sketch as base64 text: its length bound is part of the schema, checked by pydantic-core while it parses (no
# Python loop over the features; a too-long one is refused naming its field).
SketchText = Annotated[str, Field(max_length=_MAX_SKETCH_CHARS)]


class SketchError(ProtocolError, ValueError):
    """A sketch that cannot be read or merged: malformed bytes, or a mode or feature count that does not match."""


class WindowSketches(BaseModel):
    """The sketches of one telemetry window (each a base64 KLL sketch; `decode_sketch` reads them)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    rows: int = Field(ge=0)  # rows sketched
    feature_mode: FeatureMode
    input_name: str = Field(max_length=256)  # which input was sketched (the first)
    features: list[SketchText] = Field(max_length=max(MAX_DIRECT_FEATURES, PROJECTIONS))  # one per feature, in order
    confidence: SketchText | None = None  # top-1 probability
    margin: SketchText | None = None  # top1 - top2 probability
    value: SketchText | None = None  # regressor outputs

    @model_validator(mode="after")
    def _projections(self) -> WindowSketches:
        if self.feature_mode == "chunk-means" and len(self.features) not in (0, PROJECTIONS):
            raise ValueError(f"chunk-means carries {PROJECTIONS} projections, not {len(self.features)}")
        return self


def feature_matrix(batch: np.ndarray) -> tuple[np.ndarray, FeatureMode]:
    """`[n, f]` float64 features of a batch (rows along the first axis) and how they were made."""
    array = np.asarray(batch)
    if array.dtype.kind not in "biuf":
        raise SketchError(f"cannot sketch an input of type {array.dtype}")
    rows = array.reshape(len(array), -1) if array.ndim > 1 else array.reshape(-1, 1)
    width = rows.shape[1]
    if width == 0:
        raise SketchError("cannot sketch an input with no values per row")
    if width <= MAX_DIRECT_FEATURES:
        return rows.astype(np.float64, copy=False), "direct"
    # Sums per chunk, not a matrix product: a product goes through BLAS, whose thread pool (one thread per core)
    # takes milliseconds to wake on a busy device and competes with the serving threads.
    starts, lengths = _chunks(width)
    return np.add.reduceat(rows.astype(np.float64, copy=False), starts, axis=1) / lengths, "chunk-means"


@functools.lru_cache(maxsize=16)
def _chunks(width: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each of `np.array_split(row, PROJECTIONS)` starts, and its length (`width > PROJECTIONS`)."""
    lengths = np.array([len(c) for c in np.array_split(np.arange(width), PROJECTIONS)], dtype=np.float64)
    starts = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)])
    starts.flags.writeable = lengths.flags.writeable = False
    return starts, lengths


def encode_sketch(s: kll_floats_sketch) -> str:
    """A sketch as base64 text."""
    return base64.b64encode(s.serialize()).decode("ascii")


def decode_sketch(text: str) -> kll_floats_sketch:
    """The sketch `encode_sketch` wrote; `SketchError` for anything else (checked before the library reads it)."""
    if not isinstance(text, str) or len(text) > _MAX_SKETCH_CHARS:
        raise SketchError(f"a sketch is base64 text of at most {_MAX_SKETCH_CHARS} characters")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SketchError(f"sketch is not base64: {exc}") from exc
    _check_kll(data)
    try:
        return _kll().deserialize(data)
    except (RuntimeError, ValueError, MemoryError) as exc:
        raise SketchError(f"sketch does not deserialize: {exc}") from exc


# The KLL serialization (DataSketches kll_sketch_impl.hpp): an 8-byte preamble (preamble ints, serial version,
# family 15, flags, k, m, unused); empty: nothing more; one item (version 2): the item; else (version 1) n,
# min_k, num_levels, the start of every level but the last, min, max and the retained items (level 0 first).
_FAMILY, _M = 15, 8
_EMPTY, _SORTED, _SINGLE = 1, 2, 4
_POWERS_OF_3 = [3**i for i in range(31)]


def _int_cap_aux_aux(k: int, depth: int) -> int:
    return (((2 * k) << depth) // _POWERS_OF_3[depth] + 1) >> 1


def _level_capacity(k: int, num_levels: int, height: int) -> int:
    depth = num_levels - height - 1
    if depth <= 30:
        cap = _int_cap_aux_aux(k, depth)
    else:
        half = depth // 2
        cap = _int_cap_aux_aux(_int_cap_aux_aux(k, half), depth - half)
    return max(_M, cap)


def _check_kll(data: bytes) -> None:
    if len(data) < 8 or len(data) > MAX_SKETCH_BYTES:
        raise SketchError(f"sketch of {len(data)} bytes: a KLL sketch has 8 to {MAX_SKETCH_BYTES}")
    preamble, version, family, flags, k, m = struct.unpack_from("<BBBBHB", data)
    if family != _FAMILY or m != _M or flags & ~(_EMPTY | _SORTED | _SINGLE) or not 8 <= k <= MAX_SKETCH_K:
        raise SketchError(f"not a KLL floats sketch of k 8..{MAX_SKETCH_K} (family {family}, m {m}, k {k})")
    if flags & _EMPTY:
        if (preamble, len(data)) != (2, 8) or flags & _SINGLE:
            raise SketchError("malformed empty KLL sketch")
        return
    if flags & _SINGLE:
        if (preamble, version, len(data)) != (2, 2, 12):
            raise SketchError("malformed single-item KLL sketch")
        _check_items(np.frombuffer(data, dtype="<f4", offset=8))
        return
    if (preamble, version) != (5, 1) or len(data) < 20:
        raise SketchError(f"malformed KLL sketch header (preamble {preamble}, serial version {version})")
    n, min_k, num_levels = struct.unpack_from("<QHB", data, 8)
    if not 1 <= num_levels <= 61 or not 8 <= min_k <= k:
        raise SketchError(f"malformed KLL sketch: {num_levels} levels, min_k {min_k}, k {k}")
    capacity = sum(_level_capacity(k, num_levels, h) for h in range(num_levels))
    if len(data) < 20 + 4 * num_levels:
        raise SketchError("KLL sketch truncated in its levels")
    levels = [*struct.unpack_from(f"<{num_levels}I", data, 20), capacity]
    if any(a > b for a, b in itertools.pairwise(levels)):
        raise SketchError("malformed KLL sketch: levels out of order")
    items_at = 20 + 4 * num_levels + 8
    if len(data) != items_at + 4 * (capacity - levels[0]):
        raise SketchError(f"KLL sketch of {len(data)} bytes does not hold its {capacity - levels[0]} items")
    weights = sum((levels[h + 1] - levels[h]) << h for h in range(num_levels))
    if weights != n or n == 0:
        raise SketchError(f"malformed KLL sketch: n {n} but the items weigh {weights}")
    items = np.frombuffer(data, dtype="<f4", offset=items_at)
    low, high = np.frombuffer(data, dtype="<f4", count=2, offset=items_at - 8)
    _check_items(items)
    if not (low <= items.min() and items.max() <= high):
        raise SketchError("malformed KLL sketch: items outside its min and max")
    for h in range(1 if not flags & _SORTED else 0, num_levels):
        level = items[levels[h] - levels[0] : levels[h + 1] - levels[0]]
        if level.size > 1 and bool(np.any(level[1:] < level[:-1])):
            raise SketchError(f"malformed KLL sketch: level {h} is not sorted")


def _check_items(items: np.ndarray) -> None:
    if bool(np.isnan(items).any()):
        raise SketchError("malformed KLL sketch: NaN items")


def _kll() -> type[kll_floats_sketch]:
    """The DataSketches KLL class, imported on first use: an agent that has not served a request yet does not hold
    the library (~1.5 MiB resident)."""
    from datasketches import kll_floats_sketch

    return kll_floats_sketch


def _new() -> kll_floats_sketch:
    return _kll()(SKETCH_K)


def _update(sketch: kll_floats_sketch | None, parts: list[np.ndarray]) -> kll_floats_sketch | None:
    if not parts:
        return sketch
    sketch = sketch or _new()
    sketch.update(np.concatenate(parts) if len(parts) > 1 else parts[0])
    return sketch


def _merged(mine: kll_floats_sketch | None, theirs: kll_floats_sketch | None) -> kll_floats_sketch | None:
    if theirs is None:
        return mine
    mine = mine or _new()
    mine.merge(theirs)
    return mine


def _pending(values: np.ndarray | None) -> np.ndarray | None:
    """A float32 copy of `values` (never a view of the caller's arrays, which it may reuse), None when empty."""
    if values is None or values.size == 0:
        return None
    return np.array(values, dtype=np.float32).reshape(-1)


class SketchSet:
    """The sketches of a window while it is open: update per batch, merge windows (not thread-safe).

    Rows are buffered and handed to the sketches `FLUSH_ROWS` at a time: a KLL update costs about 1.5 µs a
    call but 0.03 µs a value in arrays of a few hundred, and most inferences are a batch of one.
    """

    FLUSH_ROWS = 256

    def __init__(self, input_name: str = "") -> None:
        self.input_name = input_name
        self.rows = 0
        self.feature_mode: FeatureMode | None = None
        self._features: list[kll_floats_sketch] = []
        self._confidence: kll_floats_sketch | None = None
        self._margin: kll_floats_sketch | None = None
        self._value: kll_floats_sketch | None = None
        self._pending_rows = 0
        self._pending: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [], [])

    def _check_layout(self, mode: FeatureMode, count: int) -> None:
        if self.feature_mode is None:
            self.feature_mode = mode
            self._features = [_new() for _ in range(count)]
        elif (mode, count) != (self.feature_mode, len(self._features)):
            raise SketchError(
                f"sketches of {count} {mode} features do not merge with {len(self._features)} {self.feature_mode} "
                "ones (another input shape)"
            )

    def update(self, batch_input: np.ndarray, predictions: Predictions) -> None:
        """Sketch one batch: its input rows and what the model predicted for them."""
        features, mode = feature_matrix(batch_input)
        self._check_layout(mode, features.shape[1])
        rows, confidence, margin, values = self._pending
        rows.append(np.array(features, dtype=np.float32))
        for parts, part in ((confidence, predictions.top1), (margin, predictions.margin), (values, predictions.values)):
            copied = _pending(part)
            if copied is not None:
                parts.append(copied)
        self.rows += features.shape[0]
        self._pending_rows += features.shape[0]
        if self._pending_rows >= self.FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered rows to the sketches (reading or sending a sketch does it first)."""
        rows, confidence, margin, values = self._pending
        if rows:
            columns = np.ascontiguousarray(np.concatenate(rows).T)
            for sketch, column in zip(self._features, columns, strict=True):
                sketch.update(column)
        self._confidence = _update(self._confidence, confidence)
        self._margin = _update(self._margin, margin)
        self._value = _update(self._value, values)
        self._pending, self._pending_rows = ([], [], [], []), 0

    def merge(self, other: WindowSketches | SketchSet) -> None:
        """Add `other`'s sketches; `SketchError` when its mode or feature count differs (nothing merged then)."""
        theirs = SketchSet.from_wire(other) if isinstance(other, WindowSketches) else other
        self.flush()
        theirs.flush()
        if theirs.feature_mode is not None:
            self._check_layout(theirs.feature_mode, len(theirs._features))
            for mine, sketch in zip(self._features, theirs._features, strict=True):
                mine.merge(sketch)
        self.input_name = self.input_name or theirs.input_name
        self.rows += theirs.rows
        self._confidence = _merged(self._confidence, theirs._confidence)
        self._margin = _merged(self._margin, theirs._margin)
        self._value = _merged(self._value, theirs._value)

    def to_wire(self) -> WindowSketches | None:
        """The wire form; None when nothing was sketched."""
        self.flush()
        if self.feature_mode is None and self._confidence is None and self._value is None:
            return None

        def text(s: kll_floats_sketch | None) -> str | None:
            return None if s is None else encode_sketch(s)

        return WindowSketches(
            rows=self.rows,
            feature_mode=self.feature_mode or "direct",
            input_name=self.input_name,
            features=[encode_sketch(s) for s in self._features],
            confidence=text(self._confidence),
            margin=text(self._margin),
            value=text(self._value),
        )

    @classmethod
    def from_wire(cls, w: WindowSketches) -> SketchSet:
        """A set holding `w`'s sketches; `SketchError` if any of them does not decode."""
        made = cls(w.input_name)
        made.rows = w.rows
        if w.features:
            made.feature_mode = w.feature_mode
            made._features = [decode_sketch(f) for f in w.features]

        def sketch(text: str | None) -> kll_floats_sketch | None:
            return None if text is None else decode_sketch(text)

        made._confidence, made._margin, made._value = sketch(w.confidence), sketch(w.margin), sketch(w.value)
        return made

    @property
    def feature_count(self) -> int:
        """How many feature (or projection) sketches the set holds."""
        return len(self._features)

    def feature_sketch(self, i: int) -> kll_floats_sketch | None:
        """The sketch of feature (or projection) `i`; None beyond the set's features."""
        self.flush()
        return self._features[i] if 0 <= i < len(self._features) else None

    def confidence_sketch(self) -> kll_floats_sketch | None:
        """The sketch of the top-1 probabilities."""
        self.flush()
        return self._confidence

    def margin_sketch(self) -> kll_floats_sketch | None:
        """The sketch of the top1 - top2 margins."""
        self.flush()
        return self._margin

    def value_sketch(self) -> kll_floats_sketch | None:
        """The sketch of a regressor's outputs."""
        self.flush()
        return self._value
