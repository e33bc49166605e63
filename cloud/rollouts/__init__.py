"""Quality-gated rollout waves: the pure decision core of the coordinator (no IO, no clock, no database).

A thin service persists `RolloutState` and calls
`step(state, plan, observations, now) -> (state, actions, decisions)`; it publishes `Dispatch` /
`Rollback` actions as desired states over MQTT, wakes up at `Wait.until`, and appends the decisions
(wave started, gate passed/failed with figures, retries, rollback…) to the rollout's log.

Rollout states::

    pending ─first fleet─► running ─wave installed─► baking ─bake over, gates passed─► running (next wave)
                             │                         │                         … after the last wave ─► completed
                             └──── a gate failed ──────┤                              (still serves late joiners)
                                                       ├─ on_gate_failure=pause, or no data
                                                       │  after max_data_wait ────────────────► paused
                                                       │  (gates_waiting recorded when the bake ends short of data)
                                                       └─ on_gate_failure=rollback ───────────► rolling_back

    pending | running | baking ── pause ──► paused
    paused ── resume ──► the state it left (a bake starts over)
    running | baking | paused ── promote ──► running (next wave, or the wave it names), or completed after the last
    rolling_back ── every touched device back, or given up ──► rolled_back
    any state but rolling_back | rolled_back ── abort(rollback=True) ──► rolling_back
    any state but aborted | rolled_back ── abort ──► aborted

Per device: pending → dispatched → succeeded | (failed → retry after backoff → … → failed), and on a
rollback: rollback_pending → rolling_back → rolled_back | rollback_failed.

Restart guarantee: the service persists the state returned by `step` before executing its actions.
Killed before persisting, it re-runs `step` on the old state and gets the same actions (step is
deterministic); killed after, it publishes `inflight_actions(state, plan)` again (same device, same
attempt: publishing a desired state twice is idempotent). Either way no device is sent an attempt
twice and none is skipped. Commands carry an id and are applied once even if replayed.
"""

from cloud.rollouts.actions import Action, Dispatch, Rollback, Wait
from cloud.rollouts.decisions import Decision
from cloud.rollouts.engine import command_error, gate_report, inflight_actions, step
from cloud.rollouts.gates import CohortStats, GateReport, GateResult, GateVerdict, control_mismatch, evaluate_gates
from cloud.rollouts.inputs import Abort, Command, DeviceReport, Observations, Pause, Promote, Resume
from cloud.rollouts.plan import (
    Baseline,
    GateThresholds,
    RolloutPlan,
    Selector,
    Wave,
    assign_waves,
    default_waves,
    promotion_target,
    wave_targets,
)
from cloud.rollouts.state import DevicePhase, DeviceRecord, RolloutState, RolloutStatus
from cloud.rollouts.stats import (
    EmptyDataError,
    error_rate,
    jensen_shannon_divergence,
    p95_latency_ms,
    p95_ratio,
    population_stability_index,
    psi_band,
)

__all__ = [
    "Abort",
    "Action",
    "Baseline",
    "CohortStats",
    "Command",
    "Decision",
    "DevicePhase",
    "DeviceRecord",
    "DeviceReport",
    "Dispatch",
    "EmptyDataError",
    "GateReport",
    "GateResult",
    "GateThresholds",
    "GateVerdict",
    "Observations",
    "Pause",
    "Promote",
    "Resume",
    "Rollback",
    "RolloutPlan",
    "RolloutState",
    "RolloutStatus",
    "Selector",
    "Wait",
    "Wave",
    "assign_waves",
    "command_error",
    "control_mismatch",
    "default_waves",
    "error_rate",
    "evaluate_gates",
    "gate_report",
    "inflight_actions",
    "jensen_shannon_divergence",
    "p95_latency_ms",
    "p95_ratio",
    "population_stability_index",
    "promotion_target",
    "psi_band",
    "step",
    "wave_targets",
]
