"""The ServerApp: run the rounds on the run's allowed nodes, record each phase, leave the result for the coordinator.

One FAB serves every kind of run (the FAB names one ServerApp): the run config picks FedAvg or FedProx on
Flower's Message API, with central DP when `dp-noise` > 0, or SecAgg+ on the legacy API when `secagg` is set.
Any failure — a bad run config, too few nodes connected or answering, a damaged trainable form — is raised
with a sentence that says what happened, and Flower shows it as the run's `status-details` with
`finished:failed`; nothing is written as a result then (progress lines written so far stay).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .grid import AllowedGrid
from .program import load_program, program_bytes
from .results import ResultDir
from .rounds import RoundBook
from .settings import RunSettings

__all__ = ["app"]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federated rounds and write `final.npz` and `summary.json` into `result-dir`."""
    started = time.time()
    settings = RunSettings.from_config(context.run_config)
    settings.check_server()
    results = ResultDir(Path(settings.result_dir))
    allowed = AllowedGrid(grid, settings.node_ids, default_timeout=settings.round_timeout)
    book = RoundBook(results, settings.min_nodes, settings.round_timeout)
    module, _shape = load_program(program_bytes())
    initial = {name: t.detach().cpu().numpy().copy() for name, t in module.state_dict().items()}
    dp: dict[str, Any] | None = None
    if settings.secagg:
        from .secagg import run_secagg

        final = run_secagg(allowed, context, settings, book, initial)
    else:
        from .strategy import run_message_api

        final, dp = run_message_api(allowed, settings, book, initial)
    results.final(_checked_final(initial, final))
    results.summary(
        {
            "rounds": settings.rounds,
            "nodes": sorted(book.nodes),
            "train": book.history["train"],
            "evaluate": book.history["evaluate"],
            "strategy": settings.strategy,
            "proximal_mu": settings.proximal_mu if settings.strategy == "fedprox" else None,
            "secagg": settings.secagg,
            "dp": dp,
            "epsilon": None if dp is None else dp["epsilon"],
            "seconds": round(time.time() - started, 3),
            "flower_run_id": str(context.run_id),
        }
    )


def _checked_final(initial: dict[str, np.ndarray], final: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The aggregate as a whole, finite state dict of the program in its dtypes (else the candidate could not
    load it)."""
    if list(final) != list(initial):
        raise RuntimeError(f"the aggregated weights name {sorted(final)}, the model {sorted(initial)}")
    for name, array in final.items():
        if array.shape != initial[name].shape:
            raise RuntimeError(f"aggregated {name} has shape {array.shape}, the model {initial[name].shape}")
        if not np.all(np.isfinite(array)):
            raise RuntimeError(f"aggregated {name} is not finite (NaN or infinity): lower lr or dp-noise")
    return {name: array.astype(initial[name].dtype, copy=False) for name, array in final.items()}
