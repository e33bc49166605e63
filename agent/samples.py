"""The local sample store: inputs of served requests kept for federated retraining, and their labels.

Opt-in per model (`AgentConfig.sample_rates`: model name -> share of served requests kept). For a kept
request, every row of its batch becomes one row of `<data_dir>/samples/samples.sqlite3` (SQLite, WAL,
`PRAGMA user_version = 1`, the schema below), keyed by the request's Open Inference Protocol `id` and the
row's index in the batch. Labels come back later through `POST /v2/models/{name}/labels` (`agent.server`).
The device's Flower ClientApp reads the file (read-only); nothing else does.

Only requests the local endpoint served, on the model's active version, are offered; only single-input
models are sampled (a request with several inputs is skipped and counted). Beyond `max_rows` rows of a
model the oldest are dropped and counted. The store never fails an inference: `offer()` logs each kind of
error once, counts it, and returns; a store that could not be opened is tried again later.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.errors import AgentError

if TYPE_CHECKING:  # sqlite3 (~1 MiB resident) is imported where it is used: only `sample_rates` opens a store
    import sqlite3

__all__ = [
    "SAMPLES_FILE",
    "SCHEMA",
    "USER_VERSION",
    "LabelEntry",
    "LabelsError",
    "LabelsResult",
    "SampleStats",
    "SampleStore",
    "SampleStoreError",
    "parse_labels",
    "sample_store_path",
]

log = logging.getLogger(__name__)

SAMPLES_FILE = Path("samples") / "samples.sqlite3"
USER_VERSION = 1
SCHEMA = """
CREATE TABLE samples (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  request_id TEXT NOT NULL,
  row INTEGER NOT NULL,
  model TEXT NOT NULL, version TEXT NOT NULL,
  input_name TEXT NOT NULL,
  dtype TEXT NOT NULL,
  shape TEXT NOT NULL,
  data BLOB NOT NULL,
  label TEXT,
  created_at REAL NOT NULL, labelled_at REAL,
  UNIQUE (model, request_id, row)
)
"""
_MAX_LOGGED_KINDS = 20  # distinct error kinds logged; later ones are only counted
_NUMERIC_KINDS = frozenset("biufc")  # bool, signed, unsigned, float, complex: raw bytes round-trip

Label = int | float | list[int | float]


def sample_store_path(data_dir: Path) -> Path:
    """Where an agent with `data_dir` keeps its samples (absolute: the SuperNode is told this path)."""
    return (data_dir / SAMPLES_FILE).absolute()


class SampleStoreError(AgentError):
    """The sample store cannot be opened, read or written (disk, a corrupt file); a retry later may help."""


class _RestingError(SampleStoreError):
    """The store failed a moment ago and is not tried again yet (counted, never logged: the failure was)."""


class LabelsError(AgentError):
    """A labels body the store cannot take: not the documented shape, or a label list of the wrong length."""


@dataclass(frozen=True)
class LabelEntry:
    """One fed-back label: a request id and an int class / float value, or a list of them (one per batch row)."""

    request_id: str
    label: Label


@dataclass(frozen=True)
class LabelsResult:
    """What `label()` did: rows that got a label, and the ids the store does not hold (never kept, or dropped)."""

    stored: int
    unknown: list[str]


@dataclass(frozen=True)
class SampleStats:
    """Counters of a store since the agent started (`rows` and `labelled` are read from the file)."""

    rows: dict[str, int] = field(default_factory=dict)
    labelled: dict[str, int] = field(default_factory=dict)
    kept: int = 0  # rows written
    dropped: dict[str, int] = field(default_factory=dict)  # oldest rows removed over max_rows, per model
    skipped: int = 0  # requests not kept because the store cannot represent them (several inputs, 0-d input)
    errors: int = 0  # failed store operations (each kind logged once)
    labels_stored: int = 0  # rows labelled through the endpoint


# -- the labels body (pure) -------------------------------------------------------------------------------


def parse_labels(body: Any) -> list[LabelEntry]:
    """The entries of a decoded labels body `{"labels": [{"id": ..., "label": ...}, ...]}`; `LabelsError` naming
    the first problem."""
    if not isinstance(body, dict) or "labels" not in body:
        raise LabelsError('the body must be a JSON object with a "labels" list: {"labels": [{"id": ..., "label": 3}]}')
    items = body["labels"]
    if not isinstance(items, list):
        raise LabelsError(f'"labels" must be a list of {{"id": ..., "label": ...}} objects, got {_kind(items)}')
    return [_entry(index, item) for index, item in enumerate(items)]


def _entry(index: int, item: Any) -> LabelEntry:
    where = f"labels[{index}]"
    if not isinstance(item, dict):
        raise LabelsError(f'{where} must be an object {{"id": ..., "label": ...}}, got {_kind(item)}')
    request_id = item.get("id")
    if not isinstance(request_id, str) or not request_id:
        raise LabelsError(f"{where}.id must be the request id (a non-empty string) from the inference response")
    if "label" not in item:
        raise LabelsError(f"{where} has no label")
    label = item["label"]
    if isinstance(label, list):
        if not label:
            raise LabelsError(f"{where}.label is an empty list; give one label per row of request {request_id!r}")
        for row, value in enumerate(label):
            _check_value(value, f"{where}.label[{row}]")
        return LabelEntry(request_id, list(label))
    _check_value(label, f"{where}.label")
    return LabelEntry(request_id, label)


def _check_value(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LabelsError(
            f"{where} must be an int (class index) or a float (value), or a list of those with one per batch row; "
            f"got {_kind(value)}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise LabelsError(f"{where} must be a finite number, got {value}")


def _kind(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else f"{text[:57]}..."


# -- the store ----------------------------------------------------------------------------------------------


class SampleStore:
    """The sample file of one agent; thread-safe (the endpoint's handlers call it from a thread pool)."""

    def __init__(
        self,
        path: Path,
        *,
        rates: Mapping[str, float],
        max_rows: int = 5000,
        seed: int | None = None,
        retry_s: float = 30.0,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows (sample_store_max) must be positive, got {max_rows}")
        self.path = path
        self.max_rows = max_rows
        self._rates = dict(rates)
        self._random = random.Random(seed)
        self._retry_s = retry_s
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._retry_at = 0.0
        self._logged: set[str] = set()
        self._kept = self._skipped = self._errors = self._labels = 0
        self._dropped: dict[str, int] = {}

    # -- decisions -----------------------------------------------------------------------------------------

    def opted_in(self, model: str) -> bool:
        """True when `model` is in `sample_rates` (even at rate 0): requests get ids, labels are accepted."""
        return model in self._rates

    def should_sample(self, model: str) -> bool:
        """Whether to keep this request of `model` (decided per request at the model's rate)."""
        rate = self._rates.get(model, 0.0)
        if rate <= 0.0:
            return False
        if rate >= 1.0:
            return True
        with self._lock:
            return self._random.random() < rate

    # -- writing -------------------------------------------------------------------------------------------

    def offer(self, request_id: str, model: str, version: str, inputs: Mapping[str, np.ndarray]) -> int:
        """Keep the request's rows if sampling says so; the number of rows written. Never raises."""
        try:
            if not self.should_sample(model):
                return 0
            return self.keep(request_id, model, version, inputs)
        except Exception as exc:  # the store must never fail the inference that fed it
            self._failed("keeping samples", exc)
            return 0

    def keep(self, request_id: str, model: str, version: str, inputs: Mapping[str, np.ndarray]) -> int:
        """Write every batch row of a single-input request (replacing an earlier request with the same id)."""
        import sqlite3

        rows = self._rows(request_id, model, version, inputs)
        if not rows:
            return 0
        with self._lock:
            conn = self._connection()
            try:
                with _transaction(conn):
                    conn.execute("DELETE FROM samples WHERE model = ? AND request_id = ?", (model, request_id))
                    conn.executemany(
                        "INSERT INTO samples (request_id, row, model, version, input_name, dtype, shape, data, "
                        "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        rows,
                    )
                    dropped = self._evict(conn, model)
            except sqlite3.Error as exc:
                self._broken(conn)
                raise SampleStoreError(f"cannot write samples to {self.path}: {exc}") from exc
            self._kept += len(rows)
            if dropped:
                self._dropped[model] = self._dropped.get(model, 0) + dropped
        return len(rows)

    def _rows(
        self, request_id: str, model: str, version: str, inputs: Mapping[str, np.ndarray]
    ) -> list[tuple[object, ...]]:
        """One database row per batch row; none (counted, logged once) for what the store cannot hold."""
        if len(inputs) != 1:
            return self._skip(f"model {model!r} has {len(inputs)} inputs; only single-input models are sampled")
        ((name, array),) = inputs.items()
        array = np.asarray(array)
        if array.ndim == 0:
            return self._skip(f"input {name!r} of model {model!r} has no batch axis")
        if array.dtype.kind not in _NUMERIC_KINDS:
            return self._skip(f"input {name!r} of model {model!r} has dtype {array.dtype}, not a numeric one")
        dtype, shape, now = array.dtype.name, json.dumps(list(array.shape[1:])), time.time()
        return [
            (request_id, index, model, version, name, dtype, shape, np.ascontiguousarray(array[index]).tobytes(), now)
            for index in range(array.shape[0])
        ]

    def _skip(self, reason: str) -> list[tuple[object, ...]]:
        with self._lock:
            self._skipped += 1
            self._log_once(f"skip:{reason}", "sample not kept: %s", reason)
        return []

    def _evict(self, conn: sqlite3.Connection, model: str) -> int:
        """Delete the oldest rows of `model` beyond `max_rows`; how many were deleted."""
        (count,) = conn.execute("SELECT COUNT(*) FROM samples WHERE model = ?", (model,)).fetchone()
        excess = int(count) - self.max_rows
        if excess <= 0:
            return 0
        conn.execute(
            "DELETE FROM samples WHERE id IN (SELECT id FROM samples WHERE model = ? ORDER BY id LIMIT ?)",
            (model, excess),
        )
        return excess

    # -- labels --------------------------------------------------------------------------------------------

    def label(self, model: str, entries: Sequence[LabelEntry]) -> LabelsResult:
        """Store the labels of `model`'s requests, all or none; `LabelsError` when a list does not fit its batch."""
        import sqlite3

        now = time.time()
        with self._lock:
            conn = self._connection()
            unknown: dict[str, None] = {}
            stored = 0
            try:
                with _transaction(conn):
                    for index, entry in enumerate(entries):
                        updates = self._label_rows(conn, model, index, entry, now)
                        if updates is None:
                            unknown[entry.request_id] = None
                            continue
                        conn.executemany(
                            "UPDATE samples SET label = ?, labelled_at = ? WHERE model = ? AND request_id = ? "
                            "AND row = ?",
                            updates,
                        )
                        stored += len(updates)
            except sqlite3.Error as exc:
                self._broken(conn)
                raise SampleStoreError(f"cannot store labels in {self.path}: {exc}") from exc
            self._labels += stored
        return LabelsResult(stored=stored, unknown=list(unknown))

    @staticmethod
    def _label_rows(
        conn: sqlite3.Connection, model: str, index: int, entry: LabelEntry, now: float
    ) -> list[tuple[object, ...]] | None:
        """The updates of one entry's stored rows; None when the store has no row of its request."""
        query = "SELECT row FROM samples WHERE model = ? AND request_id = ?"
        rows = [r for (r,) in conn.execute(query, (model, entry.request_id))]
        if not rows:
            return None
        # The oldest rows go first, so the last row of a request is the last to be dropped: it gives the batch size.
        batch = max(rows) + 1
        labels: Sequence[int | float]
        if isinstance(entry.label, list):
            if len(entry.label) != batch:
                raise LabelsError(
                    f"labels[{index}]: request {entry.request_id!r} had {batch} rows, "
                    f"its label list has {len(entry.label)}"
                )
            labels = entry.label
        else:
            if batch != 1:
                raise LabelsError(
                    f"labels[{index}]: request {entry.request_id!r} had {batch} rows; "
                    f"give a list of {batch} labels, one per row"
                )
            labels = [entry.label]
        return [(json.dumps(labels[r]), now, model, entry.request_id, r) for r in rows]

    # -- reading -------------------------------------------------------------------------------------------

    def stats(self) -> SampleStats:
        """Counters, and rows / labelled rows per model read from the file (empty when it cannot be read)."""
        import sqlite3

        rows: dict[str, int] = {}
        labelled: dict[str, int] = {}
        with self._lock:
            try:
                conn = self._connection()
                query = "SELECT model, COUNT(*), COUNT(label) FROM samples GROUP BY model"
                for model, count, with_label in conn.execute(query):
                    rows[model], labelled[model] = int(count), int(with_label)
            except (SampleStoreError, sqlite3.Error) as exc:  # not counted: no sample was lost
                if not isinstance(exc, _RestingError):
                    self._log_once(f"stats:{exc}", "sample store: cannot read the sample counts (%s)", exc)
            return SampleStats(
                rows=rows,
                labelled=labelled,
                kept=self._kept,
                dropped=dict(self._dropped),
                skipped=self._skipped,
                errors=self._errors,
                labels_stored=self._labels,
            )

    def close(self) -> None:
        """Close the file (a later call opens it again)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- the connection ------------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """The open connection, opening (and creating) the file when needed; at most every `retry_s` after a failure."""
        import sqlite3

        if self._conn is not None:
            return self._conn
        if time.monotonic() < self._retry_at:
            raise _RestingError(f"the sample store {self.path} failed recently; it is tried again later")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=5.0)
        except (OSError, sqlite3.Error) as exc:
            self._retry_at = time.monotonic() + self._retry_s
            raise SampleStoreError(f"cannot open the sample store {self.path}: {exc}") from exc
        try:
            _prepare(conn, self.path)
        except BaseException:
            conn.close()
            self._retry_at = time.monotonic() + self._retry_s
            raise
        self._conn = conn
        return conn

    def _broken(self, conn: sqlite3.Connection) -> None:
        """Drop a connection that failed: the file is opened again on a later call (after `retry_s`)."""
        conn.close()
        if self._conn is conn:
            self._conn = None
        self._retry_at = time.monotonic() + self._retry_s

    # -- errors --------------------------------------------------------------------------------------------

    def _failed(self, action: str, exc: Exception) -> None:
        with self._lock:
            self._count_error(action, exc)

    def _count_error(self, action: str, exc: BaseException) -> None:
        """Count an error and log its kind once (caller holds the lock)."""
        self._errors += 1
        if isinstance(exc, _RestingError):
            return
        cause = exc.__cause__ if isinstance(exc, SampleStoreError) and exc.__cause__ is not None else exc
        self._log_once(
            f"{action}:{type(cause).__name__}:{cause}",
            "sample store: %s failed (%s); inference goes on, further errors of this kind are only counted",
            action,
            exc,
        )

    def _log_once(self, kind: str, message: str, *args: object) -> None:
        if kind in self._logged:
            return
        if len(self._logged) >= _MAX_LOGGED_KINDS:
            return
        self._logged.add(kind)
        log.warning(message, *args)


def _prepare(conn: sqlite3.Connection, path: Path) -> None:
    """WAL, and the schema of format version 1 (created in an empty file); `SampleStoreError` otherwise."""
    import sqlite3

    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL stays consistent; a power loss may lose the last rows
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version == 0:
            with _transaction(conn):
                conn.execute(SCHEMA)
                conn.execute(f"PRAGMA user_version = {USER_VERSION}")
        elif version != USER_VERSION:
            raise SampleStoreError(
                f"{path} has sample store format {version}; this agent writes format {USER_VERSION} "
                "(move the file away to start a new store)"
            )
    except sqlite3.Error as exc:
        raise SampleStoreError(f"cannot use the sample store {path}: {exc}") from exc


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back when the block raises (the connection is in autocommit mode)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self._conn.execute("BEGIN IMMEDIATE")
        return self._conn

    def __exit__(self, exc_type: object, *_: object) -> None:
        import sqlite3

        if exc_type is None:
            self._conn.execute("COMMIT")
        else:
            with contextlib.suppress(sqlite3.Error):  # the original error says more
                self._conn.execute("ROLLBACK")
