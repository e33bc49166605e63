"""The ClientApp: one message → train (or evaluate) the model on this device's labelled samples, reply.

Flower starts a fresh `flwr-clientapp` process for every message, so nothing survives between messages: each
one reads the sample store, loads torch and the program, and answers. Train replies carry the new weights
(`arrays`) and `train_loss`, evaluate replies `eval_loss` and `eval_acc` on the held-out rows; both carry
`num-examples` and the process's timings (`time-*-s`). One FAB serves every kind of run, chosen by the run
config: plain (FedAvg/FedProx), central DP (`dp-noise` > 0: Flower's `fixedclipping_mod` on train messages
only — on evaluate messages it would fail for want of a clipping norm) and SecAgg+ (`secagg`, Flower's legacy
API, `secagg.py`).
"""

from __future__ import annotations

from typing import Any

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from .local import LocalRun
from .settings import DP_WEIGHT, RunSettings

__all__ = ["app"]

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this device's samples and reply with the new weights."""
    settings = RunSettings.from_config(context.run_config)
    if settings.secagg:
        from .secagg import secagg_client_app

        return secagg_client_app()(msg, context)
    if settings.dp:
        return fixedclipping_mod(msg, context, _train)
    return _train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received weights on this device's held-out samples."""
    settings = RunSettings.from_config(context.run_config)
    if settings.secagg:
        from .secagg import secagg_client_app

        return secagg_client_app()(msg, context)
    local = LocalRun.prepare(context.node_config, settings, _arrays(msg))
    loss, accuracy = local.check()
    metrics = {"eval_loss": loss, "eval_acc": accuracy, "num-examples": len(local.held_part), **local.timings}
    return Message(content=RecordDict({"metrics": MetricRecord(_weighted(metrics, settings))}), reply_to=msg)


def _train(msg: Message, context: Context) -> Message:
    settings = RunSettings.from_config(context.run_config)
    config = msg.content.config_records.get("config", {})
    server_round = int(config.get("server-round", 0))
    mu = float(config.get("proximal-mu", settings.proximal_mu)) if settings.strategy == "fedprox" else 0.0
    local = LocalRun.prepare(context.node_config, settings, _arrays(msg))
    arrays, loss = local.fit(settings, server_round=server_round, proximal_mu=mu)
    metrics = {"train_loss": loss, "num-examples": len(local.train_part), **local.timings}
    content = RecordDict(
        {
            "arrays": ArrayRecord({name: Array.from_numpy_ndarray(value) for name, value in arrays.items()}),
            "metrics": MetricRecord(_weighted(metrics, settings)),
        }
    )
    return Message(content=content, reply_to=msg)


def _arrays(msg: Message) -> dict[str, Any]:
    record = msg.content.array_records.get("arrays")
    if record is None:
        raise ValueError("the message carries no model weights ('arrays')")
    return {name: array.numpy() for name, array in record.items()}


def _weighted(metrics: dict[str, Any], settings: RunSettings) -> dict[str, Any]:
    """The reply's metrics; under DP with the equal weight the server aggregates by."""
    return {**metrics, DP_WEIGHT: 1} if settings.dp else metrics
