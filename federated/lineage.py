"""What a federated run's candidate is called, which variants it gets, what data judges them and what its card
says. Pure: JSON bodies of the coordinator's API in, plain values out (the IO is in `federated.candidate`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from compression.variants import VARIANT_SPECS

__all__ = [
    "CARD_METRICS",
    "DIGITS_SHAPES",
    "EvalChoice",
    "canary_plan",
    "candidate_card",
    "candidate_version",
    "choose_eval",
    "federated_record",
    "run_label",
    "variants_to_build",
]

_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")  # protocol.messages.Version
DIGITS_SHAPES = ((1, 8, 8), (64,))  # one example of the bundled 8x8 digits, as an image or flat
CARD_METRICS = ("train_loss", "eval_loss", "eval_acc", "num-examples")  # of the per-round metrics, on the card


def run_label(run_id: int) -> str:
    """How a version's lineage names the federated run it came from: `fl-<run id>`."""
    return f"fl-{run_id}"


def candidate_version(parent: str, run_id: int, taken: Collection[str]) -> str:
    """`<parent>-fl.<run id>`, or the first free `<parent>-fl.<run id>.<n>` (n = 2, 3, ...) when that is taken."""
    base = f"{parent}-fl.{run_id}"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}.{n}"
    if not _VERSION.match(name):
        raise ValueError(f"the candidate version {name!r} is not a valid version (at most 64 characters)")
    return name


def variants_to_build(parent: Mapping[str, Any]) -> list[str]:
    """The parent version's variants the compression package can build (fp32, the baseline, is always built)."""
    names = [str(parent.get("primary_variant") or ""), *(str(v.get("name", "")) for v in parent.get("variants", []))]
    return [n for n in VARIANT_SPECS if n != "fp32" and n in names]


@dataclass(frozen=True)
class EvalChoice:
    """The data the candidate's variants are measured and gated on (None: none, fp32 only) and why."""

    evaluation: str | None
    calibration: str | None
    note: str


def choose_eval(params: Mapping[str, Any], input_shape: Sequence[int]) -> EvalChoice:
    """The run's `eval_data`, else the bundled digits for a digits-shaped input, else nothing (fp32 only)."""
    given = params.get("eval_data")
    if given:
        return EvalChoice(str(given), str(given), f"variants gated on the run's eval_data {given}")
    if tuple(int(d) for d in input_shape) in DIGITS_SHAPES:
        return EvalChoice("digits", "digits-train", "variants gated on the bundled held-out digits")
    return EvalChoice(
        None,
        None,
        f"no eval_data for the run and the input {list(input_shape)} is not digits-shaped: only fp32 was built "
        "(start the run with --eval-data to get the parent's variants)",
    )


def federated_record(run: Mapping[str, Any], summary: Mapping[str, Any]) -> dict[str, Any]:
    """What the card says about the federated training: cohort, settings and the metrics of every round."""
    params = run.get("params", {})

    def per_round(phase: str) -> dict[str, dict[str, float]]:
        rounds = summary.get(phase, {})
        return {
            str(r): {k: float(v) for k, v in m.items() if k in CARD_METRICS and isinstance(v, int | float)}
            for r, m in sorted(rounds.items(), key=lambda item: int(item[0]))
        }

    return {
        "rounds": int(summary.get("rounds", params.get("rounds", 0))),
        "nodes": list(summary.get("nodes", run.get("node_ids", []))),
        "devices": list(run.get("devices", [])),
        "selector": dict(run.get("selector", {})),
        "strategy": params.get("strategy", summary.get("strategy")),
        "proximal_mu": params.get("proximal_mu") if params.get("strategy") == "fedprox" else None,
        "local_epochs": params.get("local_epochs"),
        "lr": params.get("lr"),
        "batch_size": params.get("batch_size"),
        "min_nodes": params.get("min_nodes"),
        "dp": summary.get("dp"),
        "epsilon": summary.get("epsilon"),
        "secagg": bool(params.get("secagg", summary.get("secagg", False))),
        "flower_run_id": run.get("flower_run_id"),
        "train": per_round("train"),
        "evaluate": per_round("evaluate"),
    }


def candidate_card(
    *,
    model: str,
    parent_version: str,
    run_id: int,
    parent_card: Mapping[str, Any] | None,
    federated: Mapping[str, Any],
    metrics: Mapping[str, float],
    risk_class: str,
    owner: str | None = None,
) -> dict[str, Any]:
    """The candidate's model card: the parent's purpose and owner, its risk class, lineage and the federated run.

    `parent_card` is the parent's card (the `card` member of the API's body), or None when it has none.
    """
    parent = dict(parent_card or {})
    ref = f"{model}:{parent_version}"
    devices = federated.get("devices") or federated.get("nodes") or []
    limitations = (
        f"Retrained from {ref} by federated run fl-{run_id} on labelled samples kept on {len(devices)} devices "
        f"({federated.get('rounds')} rounds, {federated.get('strategy')}); those samples were not reviewed "
        "centrally, and the variants were judged on the evaluation data named in the compression report."
    )
    if parent.get("limitations"):
        limitations = f"{parent['limitations']} {limitations}"
    return {
        "intended_use": parent.get("intended_use") or f"The same use as {ref}, of which it is a federated retraining.",
        "training_data": {
            "source": "federated retraining on the devices' labelled samples (never collected centrally)",
            "run": run_label(run_id),
            "devices": list(devices),
            "selector": dict(federated.get("selector", {})),
            "parent_training_data": parent.get("training_data"),
        },
        "metrics": {k: float(v) for k, v in metrics.items()},
        "limitations": limitations,
        "risk_class": risk_class,
        "owner": parent.get("owner") or owner or "edgefleet federated retraining",
        "parent_version": parent_version,
        "run": run_label(run_id),
        "federated": dict(federated),
    }


# A retrained model is meant to change predictions on the cohort it was retrained for: the prediction-shift gate
# (PSI of predicted classes against the parent) would stop exactly the candidates that work, so it is off; install
# failures, error rate and latency against the parent stay gated, and a failed gate rolls back to the parent.
CANARY_DEFAULTS: dict[str, Any] = {
    "waves": [{"count": 1, "bake_seconds": 600.0}, {"percent": 100.0, "bake_seconds": 600.0}],
    "gates": {"max_psi": None},
    "on_gate_failure": "rollback",
}


def canary_plan(
    *,
    model: str,
    version: str,
    parent_version: str,
    selector: Mapping[str, str],
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A gated rollout of the candidate to the run's cohort, the parent's devices being the control cohort.

    `overrides` (the run's `rollout_plan`) replace the defaults key by key; `gates` are merged.
    """
    plan: dict[str, Any] = {
        **CANARY_DEFAULTS,
        "model": model,
        "version": version,
        "previous_version": parent_version,
        "baseline": "control",
        "selector": {"tags": dict(selector)},
    }
    for key, value in (overrides or {}).items():
        if key in ("model", "version", "previous_version", "selector"):
            continue  # what is rolled out, against what and where, is the run's
        plan[key] = {**plan["gates"], **value} if key == "gates" and isinstance(value, Mapping) else value
    return plan
