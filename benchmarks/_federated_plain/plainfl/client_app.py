"""ClientApp (Message API): train / evaluate on the node's .npz (`--node-config 'data-path="..."'`)."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from plainfl.task import evaluate, load_data, net, now, process_age, train

app = ClientApp()


@app.train()
def do_train(msg: Message, context: Context) -> Message:
    """Train on the node's training rows; reply with the new weights."""
    age = process_age()
    started = now()
    model = net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    data = load_data(str(context.node_config["data-path"]))
    cfg = context.run_config
    server_round = int(msg.content.config_records.get("config", {}).get("server-round", 0))
    loaded = now()
    loss = train(
        model,
        data["x_train"],
        data["y_train"],
        int(cfg["local-epochs"]),
        float(cfg["lr"]),
        int(cfg["batch-size"]),
        server_round,
    )
    metrics = MetricRecord(
        {
            "train_loss": loss,
            "num-examples": len(data["y_train"]),
            "time-process-start-s": age,
            "time-load-s": loaded - started,
            "time-train-s": now() - loaded,
        }
    )
    return Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def do_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received weights on the node's held-out rows."""
    age = process_age()
    model = net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    data = load_data(str(context.node_config["data-path"]))
    loss, acc = evaluate(model, data["x_eval"], data["y_eval"])
    metrics = {"eval_loss": loss, "eval_acc": acc, "num-examples": len(data["y_eval"]), "time-process-start-s": age}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
