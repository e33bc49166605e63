"""What the ServerApp leaves in the run's result directory (on the SuperLink host) for the coordinator.

- `progress.jsonl`: one JSON line per round and phase, appended as each phase ends:
  `{"round": r, "phase": "train"|"evaluate", "replies": n, "failures": m, "nodes": ["<node id>", ...],
  "metrics": {...}, "time": unix}` plus `"missing"` (sampled nodes that did not answer in time), `"errors"`
  (node id → the reason its ClientApp gave) and `"node_metrics"` (node id → its own metrics).
- at the end, each written atomically (temporary file + `os.replace`): `final.npz` (the aggregated weights,
  one array per parameter name) and `summary.json`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = ["FINAL_FILE", "PROGRESS_FILE", "SUMMARY_FILE", "ResultDir"]

PROGRESS_FILE = "progress.jsonl"
FINAL_FILE = "final.npz"
SUMMARY_FILE = "summary.json"


class ResultDir:
    """Writes a run's progress and results into one directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def progress(self, line: Mapping[str, Any]) -> None:
        """Append one progress line (flushed to disk before returning: the coordinator tails the file)."""
        record = {**line, "time": line.get("time", time.time())}
        with (self.path / PROGRESS_FILE).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def final(self, arrays: Mapping[str, np.ndarray]) -> Path:
        """Write the aggregated weights as `final.npz`, atomically."""
        named: dict[str, Any] = dict(arrays)  # typed Any: numpy's stubs read ** as its allow_pickle flag
        return self._atomic(FINAL_FILE, lambda fh: np.savez(fh, **named))

    def summary(self, document: Mapping[str, Any]) -> Path:
        """Write `summary.json`, atomically."""
        text = json.dumps(document, indent=2, sort_keys=True) + "\n"
        return self._atomic(SUMMARY_FILE, lambda fh: fh.write(text.encode()))

    def _atomic(self, name: str, write: Callable[[BinaryIO], object]) -> Path:
        target = self.path / name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.path)
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target
