"""A driver for the rollout engine in tests: a clock, a fleet, telemetry, and the log of everything decided."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from cloud.rollouts import (
    Action,
    CohortStats,
    Command,
    Decision,
    DeviceReport,
    Dispatch,
    Observations,
    Rollback,
    RolloutPlan,
    RolloutState,
    RolloutStatus,
    step,
)
from protocol.messages import UpdatePhase
from protocol.telemetry import latency_histogram

T0 = datetime(2025, 1, 1, tzinfo=UTC)
DIGITS = {str(c): 100 for c in range(10)}


def cohort(
    n: int = 1000,
    *,
    errors: int = 0,
    latency_ms: float = 4.0,
    classes: dict[str, int] | None = None,
    devices: int = 1,
) -> CohortStats:
    """Telemetry of a cohort: `n` inferences at `latency_ms`, `errors` of them failed, classes spread evenly."""
    spread = classes or {name: n // len(DIGITS) for name in DIGITS}
    return CohortStats(
        devices=devices,
        inference_count=n,
        error_count=errors,
        latency_histogram=latency_histogram([latency_ms] * n),
        class_counts=spread,
    )


def active(device_id: str, version: str, at: datetime, model: str = "digits") -> DeviceReport:
    """The device runs `model:version`."""
    return DeviceReport(
        device_id=device_id, at=at, active_model=model, active_version=version, update_phase=UpdatePhase.ACTIVE
    )


def failed(device_id: str, at: datetime, error: str = "digest mismatch", running: str = "1.0") -> DeviceReport:
    """The device's update failed; it still runs `running`."""
    return DeviceReport(
        device_id=device_id,
        at=at,
        active_model="digits",
        active_version=running,
        update_phase=UpdatePhase.FAILED,
        error=error,
    )


def fleet_of(count: int, prefix: str = "dev", **tags: str) -> dict[str, dict[str, str]]:
    """`count` devices named `dev-000`…, all with `tags`."""
    return {f"{prefix}-{i:03d}": dict(tags) for i in range(count)}


class Sim:
    """Runs `step` like the service would: persist the state, keep every action and decision."""

    def __init__(self, plan: RolloutPlan, fleet: dict[str, dict[str, str]], rollout_id: str = "rollout-1") -> None:
        self.plan = plan
        self.fleet = dict(fleet)
        self.state = RolloutState.new(rollout_id)
        self.now = T0
        self.wave: CohortStats | None = cohort()
        self.control: CohortStats | None = cohort()
        self.actions: list[Action] = []
        self.decisions: list[Decision] = []

    def step(
        self,
        *,
        reports: Iterable[DeviceReport] = (),
        commands: Iterable[Command] = (),
        after: float = 0.0,
    ) -> tuple[list[Action], list[Decision]]:
        """Advance the clock by `after` seconds and run one step with the current fleet and telemetry."""
        self.now += timedelta(seconds=after)
        observations = Observations(
            reports=list(reports), fleet=self.fleet, wave=self.wave, control=self.control, commands=list(commands)
        )
        self.state, actions, decisions = step(self.state, self.plan, observations, self.now)
        self.actions += actions
        self.decisions += decisions
        return actions, decisions

    @property
    def status(self) -> RolloutStatus:
        return self.state.status

    def dispatched(self, actions: Iterable[Action] | None = None) -> list[str]:
        """Device ids sent the target version (by the given actions, or by all so far)."""
        return [a.device_id for a in (self.actions if actions is None else actions) if isinstance(a, Dispatch)]

    def rolled(self, actions: Iterable[Action] | None = None) -> list[str]:
        """Device ids sent back to the previous version."""
        return [a.device_id for a in (self.actions if actions is None else actions) if isinstance(a, Rollback)]

    def in_wave(self, wave: int) -> list[str]:
        """Devices assigned to `wave`."""
        return sorted(d for d, r in self.state.devices.items() if r.wave == wave)

    def succeed(self, device_ids: Iterable[str]) -> tuple[list[Action], list[Decision]]:
        """The devices report running the target version."""
        return self.step(reports=[active(d, self.plan.version, self.now, self.plan.model) for d in device_ids])

    def kinds(self, decisions: Iterable[Decision] | None = None) -> list[str]:
        """The kinds of the given decisions (or of all so far)."""
        return [d.kind for d in (self.decisions if decisions is None else decisions)]

    def run_updates(self, max_steps: int = 500) -> None:
        """Let every dispatched device succeed and let time pass until the rollout stops moving."""
        for _ in range(max_steps):
            if self.status not in {RolloutStatus.RUNNING, RolloutStatus.BAKING}:
                return
            inflight = [d for d, r in self.state.devices.items() if r.phase.value == "dispatched"]
            if inflight:
                self.succeed(inflight)
            else:
                self.step(after=60)
        raise AssertionError(f"rollout still {self.status} after {max_steps} steps")
