"""The run config of a federated run, read once and checked (pure: no Flower, no torch).

Flower hands the run config over as TOML values (`flwr run --run-config 'k=v ...'` over the defaults in
pyproject.toml); the coordinator may send `1` where a float is meant or `"true"` for a bool, so values are
coerced, and a value that cannot be is refused naming its key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DP_WEIGHT", "STRATEGIES", "RunSettings", "SettingsError"]

STRATEGIES = ("fedavg", "fedprox")
DP_WEIGHT = "dp-weight"  # the metric replies carry under DP: every node weighs the same (noise ∝ clip / nodes)
OPTIMIZERS = ("sgd", "adam")


class SettingsError(ValueError):
    """A run config value is missing or unusable; the message names the key."""


@dataclass(frozen=True)
class RunSettings:
    """Everything a run's ServerApp and ClientApps read from the run config."""

    model: str  # the model's name (`NAME` of `NAME:VERSION`): its samples of every version are trained on
    node_ids: tuple[int, ...]
    rounds: int
    strategy: str
    proximal_mu: float
    local_epochs: int
    lr: float
    batch_size: int
    optimizer: str
    min_nodes: int
    round_timeout: float
    dp_noise: float
    dp_clip: float
    secagg: bool
    min_samples: int
    eval_fraction: float
    result_dir: str

    @property
    def dp(self) -> bool:
        """Central differential privacy with client-side fixed clipping is on."""
        return self.dp_noise > 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RunSettings:
        """Read and check the run config (the checks every process needs)."""
        settings = cls(
            model=_text(config, "model").partition(":")[0],
            node_ids=_node_ids(config.get("node-ids", "")),
            rounds=_int(config, "num-server-rounds", minimum=1),
            strategy=_choice(config, "strategy", STRATEGIES),
            proximal_mu=_float(config, "proximal-mu", minimum=0.0),
            local_epochs=_int(config, "local-epochs", minimum=1),
            lr=_float(config, "lr", minimum=0.0, exclusive=True),
            batch_size=_int(config, "batch-size", minimum=1),
            optimizer=_choice(config, "optimizer", OPTIMIZERS),
            min_nodes=_int(config, "min-nodes", minimum=1),
            round_timeout=_float(config, "round-timeout", minimum=0.0, exclusive=True),
            dp_noise=_float(config, "dp-noise", minimum=0.0),
            dp_clip=_float(config, "dp-clip", minimum=0.0),
            secagg=_bool(config, "secagg"),
            min_samples=_int(config, "min-samples", minimum=1),
            eval_fraction=_float(config, "eval-fraction", minimum=0.0, exclusive=True),
            result_dir=str(config.get("result-dir", "")),
        )
        if settings.eval_fraction >= 1:
            raise SettingsError(
                f"run config eval-fraction is the share of each node's labelled samples held out for evaluation, "
                f"so below 1; got {settings.eval_fraction}"
            )
        if settings.dp and settings.dp_clip <= 0:
            raise SettingsError(f"run config dp-clip must be above 0 with dp-noise {settings.dp_noise:g}")
        return settings

    def check_server(self) -> None:
        """What the ServerApp needs beyond the rest: allowed nodes, enough of them, a result directory."""
        if not self.node_ids:
            raise SettingsError("run config node-ids is empty: no node may be sampled")
        if self.min_nodes > len(self.node_ids):
            raise SettingsError(
                f"run config min-nodes {self.min_nodes} is more than the {len(self.node_ids)} nodes in node-ids"
            )
        if not self.result_dir or not Path(self.result_dir).is_absolute():
            raise SettingsError(f"run config result-dir must be an absolute directory, got {self.result_dir!r}")
        if self.secagg and self.dp:
            raise SettingsError("secagg and dp-noise > 0 cannot be combined (SecAgg+ runs on Flower's legacy API)")
        if self.secagg and self.min_nodes < 2:
            raise SettingsError(
                "secagg needs min-nodes of at least 2 (secure aggregation of a single node hides nothing)"
            )


def _text(config: Mapping[str, Any], key: str) -> str:
    value = str(config.get(key, "")).strip()
    if not value:
        raise SettingsError(f"run config {key} is empty")
    return value


def _node_ids(value: Any) -> tuple[int, ...]:
    ids = []
    for part in str(value).replace(" ", "").split(","):
        if not part:
            continue
        try:
            node = int(part)
        except ValueError:
            raise SettingsError(f"run config node-ids: {part!r} is not a node id (unsigned integer)") from None
        if not 0 <= node < 2**64:
            raise SettingsError(f"run config node-ids: {part} is not an unsigned 64-bit node id")
        ids.append(node)
    return tuple(dict.fromkeys(ids))


def _int(config: Mapping[str, Any], key: str, *, minimum: int) -> int:
    value = _float(config, key, minimum=minimum)
    if value != int(value):
        raise SettingsError(f"run config {key} must be a whole number, got {config[key]!r}")
    return int(value)


def _float(config: Mapping[str, Any], key: str, *, minimum: float, exclusive: bool = False) -> float:
    if key not in config:
        raise SettingsError(f"run config {key} is missing")
    raw = config[key]
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = float(raw)
    except (TypeError, ValueError):
        raise SettingsError(f"run config {key} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value < minimum or (exclusive and value == minimum):
        bound = f"above {minimum:g}" if exclusive else f"at least {minimum:g}"
        raise SettingsError(f"run config {key} must be {bound}, got {raw!r}")
    return value


def _bool(config: Mapping[str, Any], key: str) -> bool:
    raw = config.get(key, False)
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise SettingsError(f"run config {key} must be true or false, got {raw!r}")


def _choice(config: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = str(config.get(key, "")).strip().lower()
    if value not in choices:
        raise SettingsError(f"run config {key} must be one of {', '.join(choices)}, got {config.get(key)!r}")
    return value
