"""The topic scheme: building, parsing, and refusing topics that could escape a device's namespace."""

from __future__ import annotations

import pytest

from protocol import Channel, TopicError, Topics


def test_builds_the_documented_topics() -> None:
    topics = Topics()
    assert topics.desired("dev-1") == "edgefleet/v1/devices/dev-1/desired"
    assert topics.reported("dev-1") == "edgefleet/v1/devices/dev-1/reported"
    assert topics.all_devices(Channel.TELEMETRY) == "edgefleet/v1/devices/+/telemetry"
    assert topics.ack("dev-1") == "edgefleet/v1/devices/dev-1/ack"


def test_parses_a_device_topic_under_a_test_prefix() -> None:
    topics = Topics("t123/edgefleet/v1")
    assert topics.parse("t123/edgefleet/v1/devices/dev-1/events") == ("dev-1", Channel.EVENTS)


@pytest.mark.parametrize(
    "topic",
    [
        "other/v1/devices/dev-1/events",
        "edgefleet/v1/devices/dev-1/unknown",
        "edgefleet/v1/devices/dev-1/events/extra",
        "edgefleet/v1/devices//events",
    ],
)
def test_rejects_topics_outside_the_scheme(topic: str) -> None:
    with pytest.raises(TopicError):
        Topics().parse(topic)


@pytest.mark.parametrize("device_id", ["+", "#", "a/b", "", "-leading-dash", "x" * 200])
def test_rejects_device_ids_that_would_break_topic_isolation(device_id: str) -> None:
    with pytest.raises(TopicError):
        Topics().desired(device_id)
