"""Input drift for a simulated cohort: rotated, noisy or inverted digits on the devices whose tags match.

A drift is written `KIND[=AMOUNT][:TAG=VALUE[,TAG=VALUE...]]`, e.g. `rotate:site=b` (every device tagged
site=b sees its digits turned a quarter), `noise=0.5:ring=canary` (Gaussian noise of standard deviation
0.5 on the 0..1 pixels), `invert` (every device: 1 - pixel). Without tags a drift applies to the whole fleet.
Pure functions of arrays and tags: the traffic generator applies them, tests check them directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DRIFT_KINDS", "Drift", "drifts_for", "parse_drift"]

# Kind → (default amount, what the amount means); invert takes no amount.
DRIFT_KINDS: dict[str, tuple[float | None, str]] = {
    "rotate": (90.0, "degrees, a multiple of 90"),
    "noise": (0.3, "standard deviation of Gaussian noise on 0..1 pixels"),
    "invert": (None, "1 - pixel, no amount"),
}
_SIDE = 8  # the digits are 8x8 images, flattened


@dataclass(frozen=True)
class Drift:
    """One input drift and the devices it applies to (every tag pair must match; none: every device)."""

    kind: str
    amount: float
    tags: Mapping[str, str] = field(default_factory=dict)

    def applies_to(self, tags: Mapping[str, str]) -> bool:
        """Whether a device carrying `tags` sees this drift."""
        return all(tags.get(key) == value for key, value in self.tags.items())

    def apply(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The drifted copy of `rows` (samples by 64 pixels in 0..1)."""
        if self.kind == "invert":
            return (1.0 - rows).astype(rows.dtype)
        if self.kind == "noise":
            return np.clip(rows + rng.normal(0.0, self.amount, rows.shape), 0.0, 1.0).astype(rows.dtype)
        if rows.shape[-1] != _SIDE * _SIDE:
            raise ValueError(f"rotate needs 8x8 digits ({_SIDE * _SIDE} features), got {rows.shape[-1]}")
        images = rows.reshape(-1, _SIDE, _SIDE)
        turned = np.rot90(images, k=int(self.amount // 90) % 4, axes=(1, 2))
        return turned.reshape(rows.shape).astype(rows.dtype)

    def describe(self) -> str:
        """`rotate=90 on site=b`."""
        where = ",".join(f"{k}={v}" for k, v in sorted(self.tags.items())) or "every device"
        amount = "" if self.kind == "invert" else f"={self.amount:g}"
        return f"{self.kind}{amount} on {where}"


def parse_drift(text: str) -> Drift:
    """`rotate:site=b`, `noise=0.5:ring=canary,site=a`, `invert` → a `Drift`; `ValueError` says what is wrong."""
    spec, _, selector = text.strip().partition(":")
    kind, has_amount, amount_text = spec.partition("=")
    kind = kind.strip().lower()
    if kind not in DRIFT_KINDS:
        raise ValueError(f"--drift {text!r}: unknown kind {kind!r}; one of {', '.join(DRIFT_KINDS)}")
    amount = DRIFT_KINDS[kind][0] or 0.0
    if has_amount and kind == "invert":
        raise ValueError(f"--drift {text!r}: invert takes no amount")
    if has_amount:
        try:
            amount = float(amount_text)
        except ValueError:
            raise ValueError(f"--drift {text!r}: {amount_text!r} is not a number") from None
    if kind == "rotate" and amount % 90:
        raise ValueError(f"--drift {text!r}: rotate by a multiple of 90 degrees (8x8 digits are not resampled)")
    if kind == "noise" and amount <= 0:
        raise ValueError(f"--drift {text!r}: noise needs a positive standard deviation")
    tags: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in selector.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--drift {text!r}: {pair!r} is not TAG=VALUE")
        tags[key.strip()] = value.strip()
    return Drift(kind, amount, tags)


def drifts_for(drifts: Sequence[Drift], tags: Mapping[str, str]) -> list[Drift]:
    """The drifts a device carrying `tags` sees, in the order given (they compose)."""
    return [d for d in drifts if d.applies_to(tags)]
