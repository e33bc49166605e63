"""The retained reported state is coalesced during an update; every phase keeps its event; the end goes out at once."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from agent.config import AgentConfig
from agent.reporting import ReportCoalescer, must_flush
from compression.reference import shifted_model
from protocol import DeviceEvent, DeviceStatus, ReportedState, UpdatePhase
from tests.agent.conftest import AgentFactory, ArtifactServer, Observer

# -- the coalescer, on a hand-driven clock and timer ----------------------------------------------------------


class Timers:
    """A `Schedule` whose actions run when the test advances the clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.due: list[tuple[float, Callable[[], None], list[bool]]] = []

    def schedule(self, delay_s: float, action: Callable[[], None]) -> Callable[[], None]:
        cancelled = [False]
        self.due.append((self.now + delay_s, action, cancelled))
        return lambda: cancelled.__setitem__(0, True)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        ready = [d for d in self.due if d[0] <= self.now]
        self.due = [d for d in self.due if d[0] > self.now]
        for _, action, cancelled in ready:
            if not cancelled[0]:
                action()


def coalescer(interval_s: float = 0.2) -> tuple[ReportCoalescer, Timers, list[str], dict[str, str]]:
    timers, sent, state = Timers(), [], {"phase": "idle"}
    reports = ReportCoalescer(lambda: sent.append(state["phase"]), interval_s=interval_s, schedule=timers.schedule)
    return reports, timers, sent, state


def test_phases_within_an_interval_publish_once_the_latest_at_its_end() -> None:
    reports, timers, sent, state = coalescer()
    for phase in ("downloading", "verifying", "staging", "loading"):
        state["phase"] = phase
        reports.report()
        timers.advance(0.04)
    assert sent == []  # nothing before the end of the interval
    timers.advance(0.04)
    assert sent == ["loading"]  # trailing edge: the state of that moment, once
    assert not reports.pending


def test_a_long_update_publishes_once_per_interval_and_never_falls_behind() -> None:
    reports, timers, sent, state = coalescer(0.25)
    for step in range(10):  # a change every 0.125 s (exact in binary: no rounding at the interval's end)
        state["phase"] = f"phase-{step}"
        reports.report()
        timers.advance(0.125)
    timers.advance(0.25)
    assert sent == ["phase-1", "phase-3", "phase-5", "phase-7", "phase-9"]


def test_a_flush_publishes_at_once_and_cancels_the_trailing_report() -> None:
    reports, timers, sent, state = coalescer()
    state["phase"] = "downloading"
    reports.report()
    state["phase"] = "committing"
    reports.report()
    assert reports.pending
    state["phase"] = "active"
    reports.flush()
    timers.advance(1.0)
    assert sent == ["active"]  # no stale trailing report after the terminal one


def test_close_after_the_goodbye_sends_nothing_more() -> None:
    reports, timers, sent, state = coalescer()
    reports.report()
    state["phase"] = "staging"
    reports.report()
    timers.advance(0.1)
    reports.flush(lambda: sent.append("offline"))
    reports.close()
    reports.report()
    timers.advance(1.0)
    assert sent == ["offline"]


def test_interval_zero_publishes_every_report() -> None:
    reports, _timers, sent, state = coalescer(0.0)
    for phase in ("downloading", "verifying", "staging"):
        state["phase"] = phase
        reports.report()
    assert sent == ["downloading", "verifying", "staging"]


def test_terminal_phases_and_no_update_are_flushed_and_phases_in_between_are_not() -> None:
    assert all(must_flush(p) for p in (None, UpdatePhase.IDLE, UpdatePhase.ACTIVE, UpdatePhase.FAILED))
    assert must_flush(UpdatePhase.ROLLED_BACK)
    assert not any(must_flush(p) for p in (UpdatePhase.DOWNLOADING, UpdatePhase.SHADOW, UpdatePhase.COMMITTING))


def test_negative_report_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="report_interval_s"):
        AgentConfig(device_id="dev-1", data_dir="/tmp/x", report_interval_s=-1)
    with pytest.raises(ValueError, match="interval_s"):
        ReportCoalescer(lambda: None, interval_s=-0.1)


# -- a real agent on a real broker ----------------------------------------------------------------------------


def _update_to_v2(
    make_agent: AgentFactory, artifacts: ArtifactServer, observer: Observer, model: bytes, interval_s: float
) -> tuple[list[ReportedState], list[DeviceEvent], float]:
    """v1, then v2: the reported states and events of generation 2, and how long the `active` report took."""
    agent = make_agent(report_interval_s=interval_s)
    agent.start()
    observer.desire("dev-1", 1, artifacts.model("digits", "1.0", model))
    assert agent.wait_for_model("1.0", 30), f"not active: {agent.update_status}"
    v2 = artifacts.model("digits", "2.0", shifted_model(model))
    observer.desire("dev-1", 2, v2)
    assert agent.wait_for_model("2.0", 30), f"not active: {agent.update_status}"
    activated = time.monotonic()
    observer.reported("dev-1", lambda r: r.update is not None and r.update.generation == 2 and r.active_model == v2.ref)
    waited = time.monotonic() - activated
    time.sleep(interval_s + 0.3)  # a trailing report, if one were (wrongly) left, would arrive by now
    reports = [
        r
        for r in observer.all(observer.topics.reported("dev-1"), ReportedState)
        if r.update is not None and r.update.generation == 2
    ]
    events = [e for e in observer.all(observer.topics.events("dev-1"), DeviceEvent) if e.generation == 2]
    return reports, events, waited


@pytest.mark.e2e
def test_update_keeps_every_phase_event_and_fewer_reports_ending_with_active(
    make_agent: AgentFactory, artifacts: ArtifactServer, observer: Observer, digits_model_bytes: bytes
) -> None:
    reports, events, waited = _update_to_v2(make_agent, artifacts, observer, digits_model_bytes, interval_s=5.0)
    phases = [e.phase for e in events]
    assert phases[0] is UpdatePhase.DOWNLOADING and phases[-1] is UpdatePhase.ACTIVE
    assert {UpdatePhase.VERIFYING, UpdatePhase.STAGING, UpdatePhase.LOADING, UpdatePhase.SWITCHING} <= set(phases)
    # With a 5 s interval every phase in between is coalesced into the trailing report, and `active` is flushed
    # at once and cancels it: one report for the whole update.
    assert [r.update.phase if r.update else None for r in reports] == [UpdatePhase.ACTIVE]
    assert len(events) >= 8
    assert waited < 2.0, "the end of an update is published at once, not at the end of the interval"
    assert reports[-1].status is DeviceStatus.ONLINE


@pytest.mark.e2e
def test_report_interval_zero_reports_every_phase_as_before(
    make_agent: AgentFactory, artifacts: ArtifactServer, observer: Observer, digits_model_bytes: bytes
) -> None:
    reports, events, _ = _update_to_v2(make_agent, artifacts, observer, digits_model_bytes, interval_s=0.0)
    assert [r.update.phase if r.update else None for r in reports] == [e.phase for e in events]


@pytest.mark.e2e
def test_stopping_mid_interval_says_offline_last(
    make_agent: AgentFactory, artifacts: ArtifactServer, observer: Observer, digits_model_bytes: bytes
) -> None:
    agent = make_agent(report_interval_s=5.0)
    agent.start()
    observer.reported("dev-1", lambda r: r.status is DeviceStatus.ONLINE)
    observer.desire("dev-1", 1, artifacts.model("digits", "1.0", digits_model_bytes))
    observer.event("dev-1", lambda e: e.phase is UpdatePhase.VERIFYING)  # a trailing report may be pending now
    agent.stop()
    observer.reported("dev-1", lambda r: r.status is DeviceStatus.OFFLINE)
    time.sleep(0.5)
    last = observer.all(observer.topics.reported("dev-1"), ReportedState)[-1]
    assert last.status is DeviceStatus.OFFLINE
