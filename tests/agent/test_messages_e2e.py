"""Malformed desired payloads over a real broker: counted, reported as events, and nothing changes."""

from __future__ import annotations

import json

import pytest

from protocol import SCHEMA_VERSION, DesiredState, DeviceEvent, ErrorCode, EventKind, encode
from tests.agent.conftest import AgentFactory, ArtifactServer, Observer

pytestmark = pytest.mark.e2e


def test_malformed_desired_payloads_are_counted_reported_and_change_nothing(
    make_agent: AgentFactory, artifacts: ArtifactServer, observer: Observer, digits_model_bytes: bytes
) -> None:
    agent = make_agent()
    agent.start()
    v1 = artifacts.model("digits", "1.0", digits_model_bytes)
    observer.desire("dev-1", 1, v1)
    assert agent.wait_for_model("1.0", 30)
    status_before = agent.update_status

    v2 = artifacts.model("digits", "2.0", digits_model_bytes[:-1] + b"\x00")
    valid = json.loads(encode(DesiredState(device_id="dev-1", generation=5, model=v2)))
    missing_model_fields = {**valid, "model": {"name": "digits"}}
    bad_payloads = {
        "not json": b"{this is not json",
        "not an object": b"[1, 2, 3]",
        "future schema": json.dumps({**valid, "schema_version": SCHEMA_VERSION + 1}).encode(),
        "wrong device": json.dumps({**valid, "device_id": "someone-else"}).encode(),
        "missing generation": json.dumps({k: v for k, v in valid.items() if k != "generation"}).encode(),
        "missing model fields": json.dumps(missing_model_fields).encode(),
    }
    topic = observer.topics.desired("dev-1")
    for payload in bad_payloads.values():
        observer.publish(topic, payload, retain=False)

    def rejected() -> list[DeviceEvent]:
        return [
            e
            for e in observer.all(observer.topics.events("dev-1"), DeviceEvent)
            if e.kind is EventKind.MESSAGE_REJECTED
        ]

    observer.event("dev-1", lambda _e: len(rejected()) >= len(bad_payloads))
    events = rejected()
    assert len(events) == len(bad_payloads) == agent.rejected_messages
    assert all(e.error is not None and e.error.code is ErrorCode.MALFORMED_MESSAGE for e in events)
    reasons = " | ".join(e.message for e in events)
    assert "not JSON" in reasons and "schema_version" in reasons and "someone-else" in reasons
    assert "generation" in reasons
    assert agent.active_model == v1.ref
    assert agent.update_status == status_before


def test_cleared_desired_state_is_not_a_malformed_message(make_agent: AgentFactory, observer: Observer) -> None:
    agent = make_agent()
    agent.start()
    observer.desire("dev-1", 1, None)
    observer.event("dev-1", lambda e: e.kind is EventKind.AGENT_STARTED)
    observer.publish(observer.topics.desired("dev-1"), b"", retain=True)  # clearing the retained message
    observer.desire("dev-1", 2, None)
    observer.reported("dev-1", lambda r: r.update is not None and r.update.generation == 2)
    assert agent.rejected_messages == 0
