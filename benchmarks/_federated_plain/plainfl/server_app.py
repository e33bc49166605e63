"""ServerApp (Message API): FedAvg over every connected node; phase timings to `result-dir`/timings.json."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from plainfl.task import net

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg that notes when each phase's messages were built and when its replies were aggregated."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.phases: list[dict[str, object]] = []
        self._started: dict[tuple[int, str], float] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._started[(server_round, "train")] = time.monotonic()
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._started[(server_round, "evaluate")] = time.monotonic()
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        self._note(server_round, "train", replies, metrics)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        self._note(server_round, "evaluate", replies, metrics)
        return metrics

    def _note(self, server_round: int, phase: str, replies: list[Message], metrics: MetricRecord | None) -> None:
        started = self._started.get((server_round, phase), time.monotonic())
        self.phases.append(
            {
                "round": server_round,
                "phase": phase,
                "replies": sum(not m.has_error() for m in replies),
                "errors": [str(m.error.reason) for m in replies if m.has_error()],
                "metrics": dict(metrics or {}),
                "seconds": round(time.monotonic() - started, 3),
            }
        )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg for `num-server-rounds`; timings.json and final.npz into `result-dir`."""
    started = time.time()
    cfg = context.run_config
    n = int(cfg["min-nodes"])
    model = net()
    if str(cfg["init-path"]):
        with np.load(str(cfg["init-path"])) as init:
            model.load_state_dict({k: torch.from_numpy(init[k]) for k in init.files})
    strategy = TimedFedAvg(
        fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(cfg["num-server-rounds"]),
        timeout=float(cfg["round-timeout"]),
        train_config=ConfigRecord({"lr": float(cfg["lr"])}),
    )
    out = Path(str(cfg["result-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    final = {k: v.detach().numpy() for k, v in result.arrays.to_torch_state_dict().items()}
    np.savez(out / "final.npz", **final)
    document = {"phases": strategy.phases, "seconds": round(time.time() - started, 3), "run_id": str(context.run_id)}
    (out / "timings.json").write_text(json.dumps(document, indent=1, default=str))
