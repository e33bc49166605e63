"""The MQTT topic scheme: `{base}/devices/{device_id}/{channel}`.

`base` defaults to `edgefleet/v1`; tests and multi-tenant brokers put their own prefix in front
(`Topics("t-1234/edgefleet/v1")`) so that nothing crosses between them.

| channel     | direction           | retained | QoS | payload                      |
|-------------|---------------------|----------|-----|------------------------------|
| desired     | coordinator → agent | yes      | 1   | `DesiredState`               |
| reported    | agent → coordinator | yes      | 1   | `ReportedState` (will: offline) |
| events      | agent → coordinator | no       | 1   | `DeviceEvent`                |
| telemetry   | agent → coordinator | no       | 1   | `TelemetryWindow`            |
| ack         | coordinator → agent | yes      | 1   | `TelemetryAck`               |
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from protocol.errors import TopicError

DEFAULT_BASE = "edgefleet/v1"

# Device ids travel inside topics, so they must not contain MQTT wildcards or separators.
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)


class Channel(StrEnum):
    """The per-device channels of the topic scheme."""

    DESIRED = "desired"
    REPORTED = "reported"
    EVENTS = "events"
    TELEMETRY = "telemetry"
    ACK = "ack"


def validate_device_id(device_id: str) -> str:
    """Return `device_id` if it is usable inside a topic, else raise `TopicError`."""
    if not _DEVICE_ID_RE.match(device_id):
        raise TopicError(
            f"invalid device id {device_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return device_id


@dataclass(frozen=True)
class Topics:
    """Builds and parses the topics under one base."""

    base: str = DEFAULT_BASE

    def __post_init__(self) -> None:
        if not self.base or self.base.endswith("/") or any(c in self.base for c in "+#"):
            raise TopicError(f"invalid topic base {self.base!r}")

    def device(self, device_id: str, channel: Channel) -> str:
        """The topic of one device's channel."""
        return f"{self.base}/devices/{validate_device_id(device_id)}/{channel.value}"

    def desired(self, device_id: str) -> str:
        """Where the coordinator publishes a device's desired state (retained)."""
        return self.device(device_id, Channel.DESIRED)

    def reported(self, device_id: str) -> str:
        """Where a device publishes its reported state (retained, with an offline will)."""
        return self.device(device_id, Channel.REPORTED)

    def events(self, device_id: str) -> str:
        """Where a device publishes update progress events."""
        return self.device(device_id, Channel.EVENTS)

    def telemetry(self, device_id: str) -> str:
        """Where a device publishes telemetry windows."""
        return self.device(device_id, Channel.TELEMETRY)

    def ack(self, device_id: str) -> str:
        """Where the coordinator acknowledges a device's stored telemetry (retained)."""
        return self.device(device_id, Channel.ACK)

    def all_devices(self, channel: Channel) -> str:
        """Subscription filter for one channel of every device."""
        return f"{self.base}/devices/+/{channel.value}"

    def parse(self, topic: str) -> tuple[str, Channel]:
        """Split a device topic into `(device_id, channel)`; `TopicError` if it is not one."""
        prefix = f"{self.base}/devices/"
        if not topic.startswith(prefix):
            raise TopicError(f"topic {topic!r} is not under {prefix!r}")
        parts = topic[len(prefix) :].split("/")
        if len(parts) != 2:
            raise TopicError(f"topic {topic!r} is not {prefix}<device>/<channel>")
        device_id, channel = parts
        try:
            return validate_device_id(device_id), Channel(channel)
        except ValueError as exc:
            raise TopicError(f"topic {topic!r} has unknown channel {channel!r}") from exc
