"""SecAgg+ runs: secure aggregation on Flower's legacy API, the only one its SecAgg+ workflow works with (1.42).

The server side is `DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))` on a `LegacyContext` with a legacy
FedAvg that records every phase like the Message-API path (`rounds.RoundBook`); the client side a legacy
`ClientApp(client_fn, mods=[secaggplus_mod])` around a NumPyClient that trains like the plain ClientApp
(`local.LocalRun`). The ServerApp only ever sees the sum of the masked updates.

What SecAgg+ costs and bounds: each round's train phase is four message exchanges (setup, key shares, masked
vectors, unmasking), each a fresh ClientApp process per node; weights are clipped to ±8 before quantization
(`clipping_range`); a node's weight is its number of training examples capped at `SECAGG_MAX_WEIGHT`; and
the sum is only recovered while at least `reconstruction_threshold` (= `min-nodes`) nodes stay in the round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Parameters, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

from .grid import AllowedGrid
from .local import LocalRun
from .rounds import Answer, RoundBook, RoundFailedError, reason_text
from .settings import RunSettings

__all__ = ["SECAGG_MAX_WEIGHT", "run_secagg", "secagg_client_app"]

SECAGG_MAX_WEIGHT = 1000  # examples; SecAgg+ quantizes weight x update, larger weights risk overflow


# -- the client ----------------------------------------------------------------------------------------------


class _Client(NumPyClient):
    """Trains and evaluates like the Message-API ClientApp, on lists of arrays in state-dict order."""

    def __init__(self, context: Context) -> None:
        self.node_config = context.node_config
        self.settings = RunSettings.from_config(context.run_config)

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        local = LocalRun.prepare(self.node_config, self.settings, parameters)
        mu = float(config.get("proximal-mu", 0.0))
        arrays, loss = local.fit(self.settings, server_round=int(config.get("server-round", 0)), proximal_mu=mu)
        weight = min(len(local.train_part), SECAGG_MAX_WEIGHT)
        return list(arrays.values()), weight, {"train_loss": loss, **local.timings}

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        local = LocalRun.prepare(self.node_config, self.settings, parameters)
        loss, accuracy = local.check()
        return loss, len(local.held_part), {"eval_loss": loss, "eval_acc": accuracy, **local.timings}


def secagg_client_app() -> ClientApp:
    """The legacy ClientApp with the SecAgg+ mod (the plain ClientApp hands SecAgg+ runs' messages to it)."""
    return ClientApp(client_fn=lambda context: _Client(context).to_client(), mods=[secaggplus_mod])


# -- the server ----------------------------------------------------------------------------------------------


def _weighted_mean(pairs: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    total = sum(n for n, _ in pairs)
    keys = {k for _, m in pairs for k, v in m.items() if isinstance(v, int | float)}
    return {k: sum(n * float(m.get(k, 0.0)) for n, m in pairs) / total for k in keys} if total else {}


class _RecordedFedAvg(FedAvg):
    """Legacy FedAvg that waits for `min-nodes`, records each phase and fails the run below `min-nodes`."""

    def __init__(self, *, settings: RunSettings, grid: AllowedGrid, book: RoundBook, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._settings, self._grid, self._book = settings, grid, book

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> Any:
        return self._configure(server_round, "train", super().configure_fit, parameters, client_manager)

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> Any:
        return self._configure(server_round, "evaluate", super().configure_evaluate, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> Any:
        answers = _answers(results, failures)
        self._book.require(server_round, "train", answers)
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        self._book.record(server_round, "train", answers, metrics)
        return parameters, metrics

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]) -> Any:
        answers = _answers(results, failures)
        self._book.require(server_round, "evaluate", answers)
        loss, metrics = super().aggregate_evaluate(server_round, results, failures)
        self._book.record(server_round, "evaluate", answers, metrics)
        return loss, metrics

    def _configure(
        self, server_round: int, phase: str, configure: Callable[..., Any], parameters: Parameters, manager: Any
    ) -> Any:
        self._grid.wait_for_nodes(
            self._settings.min_nodes, self._settings.round_timeout, what=f"round {server_round} ({phase})"
        )
        instructions = configure(server_round, parameters, manager)
        self._book.sent(server_round, phase, [proxy.node_id for proxy, _ in instructions])
        return instructions


def _answers(results: list[Any], failures: list[Any]) -> list[Answer]:
    answers = [
        Answer(str(proxy.node_id), metrics={**res.metrics, "num-examples": res.num_examples}) for proxy, res in results
    ]
    for failure in failures:
        if isinstance(failure, BaseException):
            answers.append(Answer("unknown", error=reason_text(str(failure))))
        else:
            proxy, res = failure
            answers.append(Answer(str(proxy.node_id), error=reason_text(str(res.status.message))))
    return answers


def _checked_fit(workflow: SecAggPlusWorkflow, grid: AllowedGrid, book: RoundBook) -> Callable[[Any, Any], None]:
    """The SecAgg+ fit workflow, failing the run when it stops without an aggregate (it only logs that)."""

    def fit(_grid: Any, context: Any) -> None:
        server_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        grid.trouble.clear()
        workflow(_grid, context)
        if str(server_round) not in book.history["train"]:
            causes = "; ".join(f"node {n}: {reason_text(r)}" for n, r in sorted(grid.trouble.items()))
            raise RoundFailedError(
                f"SecAgg+ stopped in round {server_round} (train) without an aggregate: fewer than the "
                f"{book.min_nodes} required nodes took part in every stage" + (f" ({causes})" if causes else "")
            )

    return fit


def run_secagg(
    grid: AllowedGrid, context: Context, settings: RunSettings, book: RoundBook, initial: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Run every round with SecAgg+; the final weights by parameter name."""
    names = list(initial)
    mu = settings.proximal_mu if settings.strategy == "fedprox" else 0.0
    n = settings.min_nodes
    strategy = _RecordedFedAvg(
        settings=settings,
        grid=grid,
        book=book,
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=n,
        min_evaluate_clients=n,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters([initial[name] for name in names]),
        on_fit_config_fn=lambda r: {"server-round": r, "proximal-mu": mu},
        on_evaluate_config_fn=lambda r: {"server-round": r},
        fit_metrics_aggregation_fn=_weighted_mean,
        evaluate_metrics_aggregation_fn=_weighted_mean,
    )
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=settings.rounds, round_timeout=settings.round_timeout),
        strategy=strategy,
    )
    secagg = SecAggPlusWorkflow(
        num_shares=1.0,  # every sampled node holds a share of every other's key
        reconstruction_threshold=n,
        max_weight=SECAGG_MAX_WEIGHT,
        timeout=settings.round_timeout,
    )
    DefaultWorkflow(fit_workflow=_checked_fit(secagg, grid, book))(grid, legacy)
    arrays = legacy.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
    return {name: np.asarray(array) for name, array in zip(names, arrays, strict=True)}
