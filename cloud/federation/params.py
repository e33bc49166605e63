"""What a federated run is asked to do: the body of `POST /api/v1/federated/runs`, its limits and defaults. Pure.

The CLI reads the defaults from here for its `--help`; the run service checks what no single field can
(`check_params`) and keeps the resolved values as the run's `params`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from cloud.errors import InvalidInputError

__all__ = [
    "DEFAULT_PROXIMAL_MU",
    "MAX_PROGRAM_BYTES",
    "MAX_ROUNDS",
    "MODEL_PATTERN",
    "STRATEGIES",
    "CandidateReport",
    "FederatedRunCreate",
    "check_params",
]

STRATEGIES = ("fedavg", "fedprox")
MAX_ROUNDS = 100
# A Flower App (FAB) carries at most 10 MB and the trainable form travels inside it (base64 in trainable.json).
MAX_PROGRAM_BYTES = 10 * 1024 * 1024
DEFAULT_PROXIMAL_MU = 0.1  # FedProx's proximal term when the request names none
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
MODEL_PATTERN = rf"^{_NAME}(:[A-Za-z0-9][A-Za-z0-9._+-]{{0,63}}|@{_NAME})$"

TagKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
TagValue = Annotated[str, StringConstraints(max_length=256)]


class FederatedRunCreate(BaseModel):
    """A federated retraining run of one registered version on the devices a selector picks."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        pattern=MODEL_PATTERN,
        description="The parent version: `NAME:VERSION`, or `NAME@ALIAS` (resolved once, now).",
        examples=["digits-cnn:1.0"],
    )
    selector: dict[TagKey, TagValue] = Field(
        default_factory=dict, description="Tags every device of the cohort carries (ANDed); empty: the whole fleet."
    )
    rounds: int = Field(default=3, ge=1, le=MAX_ROUNDS, description="Federated rounds (server rounds).")
    strategy: Literal["fedavg", "fedprox"] = Field(default="fedavg", description="Aggregation strategy.")
    min_nodes: int = Field(
        default=2, ge=2, le=10_000, description="Devices that must be eligible to start, and train in each round."
    )
    local_epochs: int = Field(default=1, ge=1, le=100, description="Epochs each device trains per round.")
    lr: float = Field(default=0.01, gt=0, le=10, description="Learning rate of the devices' SGD.")
    batch_size: int = Field(default=32, ge=1, le=4096, description="Batch size on the devices.")
    proximal_mu: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description=f"FedProx's proximal term (fedprox only; default {DEFAULT_PROXIMAL_MU}).",
    )
    dp_noise: float = Field(
        default=0.0, ge=0, le=100, description="Noise multiplier of client-side DP (0: no differential privacy)."
    )
    dp_clip: float | None = Field(default=None, gt=0, le=1e6, description="Clipping norm of client-side DP.")
    secagg: bool = Field(default=False, description="Secure aggregation (SecAgg+); needs at least 3 nodes.")
    round_timeout_s: float = Field(
        default=600.0, ge=10, le=86_400, description="How long a round waits for replies before aggregating."
    )
    min_samples: int = Field(
        default=10, ge=1, le=10_000_000, description="Labelled samples a device needs to take part in a round."
    )
    eval_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="Share of each device's labelled samples held out for evaluation."
    )
    eval_data: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="Held-out data (an absolute path on the coordinator host) the candidate builder evaluates on.",
    )
    rollout: Literal["canary"] | None = Field(
        default=None, description="`canary`: the candidate builder starts a canary rollout of the new version."
    )
    rollout_plan: dict[str, Any] | None = Field(
        default=None,
        description="Overrides of the canary rollout plan (`waves`, `gates`, `on_gate_failure`, ... as in "
        "POST /rollouts); default: 1 device, then all, each baking 10 minutes, prediction-shift gate off.",
    )
    max_accuracy_drop: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Accuracy gate: the candidate may lose at most this much accuracy (0.05 = 5 points) against "
        "the parent on the evaluation data; a candidate that loses more is registered but not rolled out.",
    )


class CandidateReport(BaseModel):
    """What the candidate builder reports: the version it pushed (and rollout it started), or why it failed."""

    model_config = ConfigDict(extra="forbid")

    candidate_version: str | None = Field(default=None, max_length=64, description="The version pushed.")
    rollout_id: int | None = Field(default=None, ge=1, description="The canary rollout started, if any.")
    error: str | None = Field(default=None, max_length=4000, description="Why no candidate was built.")


def check_params(body: FederatedRunCreate) -> dict[str, Any]:
    """The run's parameters (defaults resolved), or `InvalidInputError` for what no single field can say."""
    if body.dp_noise > 0 and body.dp_clip is None:
        raise InvalidInputError("dp_noise needs dp_clip, the clipping norm of each update (e.g. 5.0)", field="dp_clip")
    if body.dp_noise == 0 and body.dp_clip is not None:
        raise InvalidInputError("dp_clip applies only with dp_noise > 0 (differential privacy)", field="dp_clip")
    if body.strategy != "fedprox" and body.proximal_mu:
        raise InvalidInputError("proximal_mu applies to the fedprox strategy only", field="proximal_mu")
    if body.rollout_plan is not None and body.rollout is None:
        raise InvalidInputError("rollout_plan applies only with rollout: canary", field="rollout_plan")
    if body.secagg and body.dp_noise > 0:
        raise InvalidInputError(
            "secure aggregation and differential privacy cannot be combined (SecAgg+ runs on Flower's legacy API)",
            field="secagg",
        )
    if body.secagg and body.min_nodes < 3:
        raise InvalidInputError(
            f"secure aggregation needs at least 3 nodes; min_nodes is {body.min_nodes}", field="min_nodes"
        )
    params = body.model_dump(exclude={"model", "selector"})
    if body.proximal_mu is None:
        params["proximal_mu"] = DEFAULT_PROXIMAL_MU if body.strategy == "fedprox" else 0.0
    return params
