"""`edgefleet ct ...`: continuous training — a drift alert on a cohort retrains the model there, federatedly.

    edgefleet ct set digits --on drift --by site --retrain federated --rounds 3 --rollout canary
    edgefleet ct set digits --on estimated_accuracy --by site --wait-for retrain
    edgefleet ct set digits --on drift --by site --wait-for retrain,promote
    edgefleet ct status [--model digits] [--json]
    edgefleet ct approve 4 | edgefleet ct reject 4 --reason "site b is being recalibrated"
    edgefleet ct unset digits

A turn of the loop: the alert (`edgefleet alerts list`) → a federated run on the cohort (`edgefleet federated
status`) → the candidate version, built, signed and canaried against the parent → promoted or rolled back by the
rollout's gates. With `--wait-for promote` the turn stops in `awaiting_promotion` once the canary wave passed its
gates: `ct approve` promotes the rest of the cohort, `ct reject` rolls the canary back. Each step is in `ct status`
and in the audit log (`ct.*`).
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group, RenderableType

from cloud.cli._common import JsonOpt, TokenOpt, UrlOpt, api_errors, connect, emit, fail, table

__all__ = ["ct_app", "render_status"]

ct_app = typer.Typer(
    help="Continuous training: turn a cohort's drift alert into a federated run, a candidate and a canary rollout.",
    no_args_is_help=True,
)


class Trigger(StrEnum):
    """Which alert starts a turn."""

    DRIFT = "drift"
    ESTIMATED_ACCURACY = "estimated_accuracy"
    LABELLED_ACCURACY = "labelled_accuracy"


class Retrain(StrEnum):
    """How the cohort's model is retrained."""

    FEDERATED = "federated"


class Rollout(StrEnum):
    """What happens with the candidate."""

    CANARY = "canary"
    NONE = "none"


class Strategy(StrEnum):
    """How the devices' updates are aggregated."""

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"


@ct_app.command("set")
def ct_set(
    model: Annotated[str, typer.Argument(help="Model name (the policy covers all its versions).")],
    on: Annotated[Trigger, typer.Option("--on", help="The alert that starts a turn.")] = Trigger.DRIFT,
    by: Annotated[str, typer.Option("--by", help="The device tag whose values are the cohorts, e.g. site.")] = "site",
    retrain: Annotated[Retrain, typer.Option("--retrain", help="How to retrain.")] = Retrain.FEDERATED,
    rounds: Annotated[int, typer.Option("--rounds", min=1, max=1000, help="Federated rounds.")] = 3,
    strategy: Annotated[Strategy, typer.Option("--strategy", help="Aggregation.")] = Strategy.FEDAVG,
    min_nodes: Annotated[int, typer.Option("--min-nodes", min=1, help="Devices a run needs.")] = 2,
    local_epochs: Annotated[int, typer.Option("--local-epochs", min=1, max=100, help="Epochs per round.")] = 1,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="The devices' learning rate.")] = 0.01,
    rollout: Annotated[
        Rollout, typer.Option("--rollout", help="canary: gated rollout on the cohort; none: a person decides.")
    ] = Rollout.CANARY,
    wait_for: Annotated[
        list[str] | None,
        typer.Option(
            "--wait-for",
            help="Steps that wait for a person's `ct approve`: retrain (before training), promote (after the "
            "canary wave passed its gates); comma-separated or repeated.",
        ),
    ] = None,
    cooldown: Annotated[int, typer.Option("--cooldown", min=0, help="Seconds after a turn before the next.")] = 3600,
    disabled: Annotated[bool, typer.Option("--disabled", help="Store the policy but start no turns.")] = False,
    rollout_plan: Annotated[
        Path | None,
        typer.Option(
            "--rollout-plan",
            exists=True,
            dir_okay=False,
            help="JSON overriding the candidate's canary plan (waves, gates), as `federated run --rollout-plan`.",
        ),
    ] = None,
    max_accuracy_drop: Annotated[
        float | None,
        typer.Option("--max-accuracy-drop", min=0.0, max=1.0, help="Accuracy gate against the parent (0.05 = 5 pts)."),
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create or replace MODEL's continuous-training policy."""
    body = {
        "trigger": on.value, "by": by, "retrain": retrain.value, "rounds": rounds, "strategy": strategy.value,
        "min_nodes": min_nodes, "local_epochs": local_epochs, "lr": lr, "rollout": rollout.value,
        "wait_for": _steps(wait_for), "cooldown_s": cooldown, "enabled": not disabled,
        "rollout_plan": _plan(rollout_plan), "max_accuracy_drop": max_accuracy_drop,
    }  # fmt: skip
    with api_errors():
        stored = connect(url, token).set_ct_policy(model, body)
    emit(stored, as_json, _policy_line)


def _plan(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(f"--rollout-plan {path}: not JSON ({exc})")
    if not isinstance(plan, dict):
        fail(f"--rollout-plan {path}: a plan is a JSON object (waves, gates)")
    return plan


def _policy_line(p: dict[str, Any]) -> str:
    waits = f", waits for a person to approve: {p['wait_for']}" if p["wait_for"] else ""
    state = "" if p["enabled"] else " (disabled)"
    return (
        f"policy of {p['model_name']}{state}: on a {p['trigger']} alert of a {p['by']}=… cohort, {p['retrain']} "
        f"retraining ({p['rounds']} rounds, {p['strategy']}, at least {p['min_nodes']} devices), rollout "
        f"{p['rollout']}{waits}"
    )


@ct_app.command("unset")
def ct_unset(
    model: Annotated[str, typer.Argument(help="Model name.")], url: UrlOpt = None, token: TokenOpt = None
) -> None:
    """Remove MODEL's policy (refused while one of its turns is unfinished)."""
    with api_errors():
        connect(url, token).delete_ct_policy(model)
    typer.echo(f"removed the continuous-training policy of {model}")


def render_status(body: dict[str, Any]) -> RenderableType:
    """Policies, then turns with their run, candidate, rollout and status."""
    policies = table(
        "policies",
        ["model", "on", "by", "rounds", "rollout", "waits for", "enabled"],
        [[p["model_name"], p["trigger"], p["by"], p["rounds"], p["rollout"], p["wait_for"] or None, p["enabled"]]
         for p in body["policies"]],
    )  # fmt: skip
    turns = table(
        "turns (newest first)",
        ["id", "model", "cohort", "status", "run", "candidate", "rollout", "detail"],
        [[a["id"], f"{a['model_name']}:{a['version']}", a["cohort"], a["status"], a["federated_run_id"],
          a["candidate_version"], a["rollout_id"], a["detail"]] for a in body["actions"]],
        whole=["id"],
    )  # fmt: skip
    return Group(policies, turns)


def _steps(values: list[str] | None) -> str:
    """`--wait-for a,b --wait-for c` as the policy's comma-separated `wait_for`, each step once."""
    steps = [s.strip() for v in values or [] for s in v.split(",") if s.strip()]
    return ",".join(dict.fromkeys(steps))


@ct_app.command("status")
def ct_status(
    model: Annotated[str | None, typer.Option("--model", help="Only this model's.")] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Policies and the newest turns of the loop."""
    with api_errors():
        body = connect(url, token).ct_status(model)
    emit(body, as_json, render_status)


@ct_app.command("approve")
def ct_approve(
    action_id: Annotated[int, typer.Argument(help="The turn's id (ct status).")],
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Approve the step a turn waits for: its federated run starts, or its held canary is promoted."""
    with api_errors():
        body = connect(url, token).ct_decide(action_id, approve=True)
    emit(body, as_json, lambda a: f"turn {a['id']}: {a['status']} — {a['detail']}")


@ct_app.command("reject")
def ct_reject(
    action_id: Annotated[int, typer.Argument(help="The turn's id (ct status).")],
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the turn and the audit log).")] = "",
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Decline the step a turn waits for: the turn ends (a held canary is aborted and rolled back)."""
    with api_errors():
        body = connect(url, token).ct_decide(action_id, approve=False, reason=reason)
    emit(body, as_json, lambda a: f"turn {a['id']}: {a['status']} — {a['detail']}")
