"""Model cards on the command line: read a card file, and merge `--set key=value` edits into a card (pure)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["apply_sets", "parse_ref", "read_card_file"]

# Card sections whose values are numbers: `--set metrics.accuracy=0.97` stores 0.97, not "0.97".
_NUMERIC_SECTIONS = frozenset({"metrics"})


def parse_ref(ref: str) -> tuple[str, str]:
    """`NAME:VERSION` → (name, version); `ValueError` says what is wrong."""
    name, sep, version = ref.partition(":")
    if not sep or not name or not version:
        raise ValueError(f"model must be NAME:VERSION, got {ref!r}")
    return name, version


def read_card_file(path: Path) -> dict[str, Any]:
    """A card from a JSON file; `ValueError` names the file and the problem."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a model card is a JSON object, not {type(data).__name__}")
    return data


def apply_sets(card: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """`card` with every `key=value` (dotted keys reach into objects) applied in order; the input is not changed.

    Values are text, except under `metrics`, where they must be numbers. `ValueError` names the bad edit.
    """
    result = copy.deepcopy(card)
    for item in sets:
        key, sep, raw = item.partition("=")
        path = [part.strip() for part in key.split(".")]
        if not sep or not all(path):
            raise ValueError(f"--set {item!r}: expected key=value (e.g. owner=vision-team, metrics.accuracy=0.97)")
        value: Any = _number(item, raw) if path[0] in _NUMERIC_SECTIONS and len(path) > 1 else raw
        target = result
        for depth, part in enumerate(path[:-1]):
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                where = ".".join(path[: depth + 1])
                raise ValueError(f"--set {item!r}: {where} is {type(target).__name__}, not an object")
        target[path[-1]] = value
    return result


def _number(item: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"--set {item!r}: {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"--set {item!r}: a metric must be a finite number")
    return value
