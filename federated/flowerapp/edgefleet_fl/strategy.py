"""FedAvg / FedProx (optionally under central DP) on Flower's Message API, with every phase recorded.

`RecordedStrategy` wraps the strategy Flower runs: before each phase it waits (at most `round-timeout`) for
`min-nodes` allowed nodes to be connected, after each it writes the progress line and fails the run when fewer
than `min-nodes` answered. Without DP every connected allowed node is sampled and weighted by its number of
examples; under DP exactly `min-nodes` nodes are sampled per round, weighted equally, because Flower's noise
(stdev = noise * clip / sampled nodes) is calibrated to an unweighted mean of that many clipped updates.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg, FedProx, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from .grid import AllowedGrid
from .rounds import Answer, RoundBook, reason_text
from .settings import DP_WEIGHT, RunSettings

__all__ = ["DP_DELTA", "RecordedStrategy", "run_message_api"]

DP_DELTA = 1e-5  # the delta at which epsilon is reported (client-level DP)
EXAMPLES = "num-examples"


class RecordedStrategy(Strategy):
    """Delegates to `inner`; records each phase and enforces `min-nodes` (see the module docstring)."""

    def __init__(self, inner: Strategy, *, grid: AllowedGrid, book: RoundBook, settings: RunSettings) -> None:
        self.inner = inner
        self.grid = grid
        self.book = book
        self.settings = settings

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Wait for enough nodes, then let the wrapped strategy sample and build the messages."""
        return self._configure(server_round, "train", self.inner.configure_train, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As `configure_train`, for evaluation."""
        return self._configure(server_round, "evaluate", self.inner.configure_evaluate, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fail the run unless `min-nodes` answered; aggregate; record the round."""
        replies = list(replies)
        answers = _answers(replies)
        self.book.require(server_round, "train", answers)
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        self.book.record(server_round, "train", answers, _plain(metrics))
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """As `aggregate_train`, for evaluation."""
        replies = list(replies)
        answers = _answers(replies)
        self.book.require(server_round, "evaluate", answers)
        metrics = self.inner.aggregate_evaluate(server_round, replies)
        self.book.record(server_round, "evaluate", answers, _plain(metrics))
        return metrics

    def _configure(
        self, server_round: int, phase: str, configure: Any, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        self.grid.wait_for_nodes(
            self.settings.min_nodes, self.settings.round_timeout, what=f"round {server_round} ({phase})"
        )
        messages = list(configure(server_round, arrays, config, grid))
        self.book.sent(server_round, phase, [m.metadata.dst_node_id for m in messages])
        return messages


def _answers(replies: list[Message]) -> list[Answer]:
    answers = []
    for msg in replies:
        node = str(msg.metadata.src_node_id)
        if msg.has_error():
            answers.append(Answer(node, error=reason_text(str(msg.error.reason))))
        else:
            records = list(msg.content.metric_records.values())
            answers.append(Answer(node, metrics=_plain(records[0]) if records else {}))
    return answers


def _plain(metrics: MetricRecord | None) -> dict[str, Any] | None:
    return None if metrics is None else {k: v for k, v in metrics.items() if k != DP_WEIGHT}


def _by_examples(records: list[RecordDict], _weight_key: str) -> MetricRecord:
    """Metrics averaged by examples, also when the weights are aggregated by another key (DP)."""
    return aggregate_metricrecords(records, EXAMPLES)


def build_strategy(settings: RunSettings) -> tuple[Strategy, Any]:
    """(the strategy Flower runs, the DP accountant or None)."""
    n = settings.min_nodes
    common: dict[str, Any] = {
        "min_train_nodes": n,
        "min_evaluate_nodes": n,
        "min_available_nodes": n,
        "fraction_evaluate": 1.0,
        "train_metrics_aggr_fn": _by_examples,
        "evaluate_metrics_aggr_fn": _by_examples,
    }
    if settings.dp:
        # Exactly n nodes per round: FedAvg samples max(int(connected * fraction), n), and connected ≤ allowed.
        common |= {"fraction_train": n / len(settings.node_ids), "weighted_by_key": DP_WEIGHT}
    else:
        common |= {"fraction_train": 1.0, "weighted_by_key": EXAMPLES}
    inner: Strategy = (
        FedProx(proximal_mu=settings.proximal_mu, **common) if settings.strategy == "fedprox" else FedAvg(**common)
    )
    if not settings.dp:
        return inner, None
    accountant = _accountant(settings)
    strategy = DifferentialPrivacyClientSideFixedClipping(
        inner,
        noise_multiplier=settings.dp_noise,
        clipping_norm=settings.dp_clip,
        num_sampled_clients=n,
        accountant=accountant,
    )
    return strategy, accountant


def _accountant(settings: RunSettings) -> Any:
    """Flower's RDP accountant (no amplification by sampling), or None when its optional backend is missing."""
    try:
        from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

        config = PrivacyConfig(
            target_delta=DP_DELTA,
            population_size=len(settings.node_ids),
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
        return RdpAccountant(config)
    except ImportError:  # needs `dp-accounting` (flwr[dp]), which the Flower venv does not install
        return None


def run_message_api(
    grid: AllowedGrid, settings: RunSettings, book: RoundBook, initial: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """Run every round; (the final weights, the DP report or None)."""
    strategy, accountant = build_strategy(settings)
    recorded = RecordedStrategy(strategy, grid=grid, book=book, settings=settings)
    result = recorded.start(
        grid=grid,
        initial_arrays=ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in initial.items()}),
        num_rounds=settings.rounds,
        timeout=settings.round_timeout,
        train_config=ConfigRecord({"lr": settings.lr, "local-epochs": settings.local_epochs}),
    )
    final = {name: np.asarray(array.numpy()) for name, array in result.arrays.items()} or dict(initial)
    return final, dp_report(settings, accountant)


def dp_report(settings: RunSettings, accountant: Any) -> dict[str, Any] | None:
    """What the DP of a run was: mechanism, noise, clip, sampled nodes and (when accounted) epsilon at delta."""
    if not settings.dp:
        return None
    spent = accountant.get_privacy_spent() if accountant is not None else None
    return {
        "mechanism": "central DP, client-side fixed clipping (Gaussian noise on the aggregate)",
        "noise_multiplier": settings.dp_noise,
        "clipping_norm": settings.dp_clip,
        "sampled_nodes_per_round": settings.min_nodes,
        "noise_stdev": settings.dp_noise * settings.dp_clip / settings.min_nodes,
        "rounds": settings.rounds,
        "epsilon": None if spent is None else float(spent.epsilon),
        "delta": DP_DELTA if spent is not None else None,
        "accountant": "flwr RdpAccountant (no amplification)" if spent is not None else None,
        "note": None
        if spent is not None
        else "no epsilon: Flower's RDP accountant needs the optional dp-accounting package (flwr[dp])",
    }
