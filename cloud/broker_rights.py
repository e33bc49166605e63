"""Who may do what on the broker: one set of rules for the embedded broker's plugin and Mosquitto's ACL file.

A device (client certificate with OU `device`, CN = its id) may publish only its own reported state, events
and telemetry, and subscribe to and receive only its own desired state and telemetry acknowledgements. The
coordinator (CN `COORDINATOR_IDENTITY`) may do everything under the topic base. Nobody else may connect.
Pure: no IO.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from protocol.identity import COORDINATOR_IDENTITY, COORDINATOR_OU, DEVICE_OU
from protocol.topics import Topics, validate_device_id

__all__ = [
    "DEVICE_PUBLISHES",
    "DEVICE_RECEIVES",
    "Action",
    "Identity",
    "identity_of",
    "mosquitto_acl",
    "topic_allowed",
]

DEVICE_PUBLISHES = ("reported", "events", "telemetry")
DEVICE_RECEIVES = ("desired", "ack")


class Action(StrEnum):
    """What a client does with a topic."""

    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    RECEIVE = "receive"


@dataclass(frozen=True)
class Identity:
    """An authenticated broker client: a device (by id) or the coordinator."""

    name: str
    coordinator: bool = False


def identity_of(common_name: str, unit: str) -> Identity | None:
    """The identity a certificate's CN and OU give, or None when it is neither a device nor the coordinator."""
    if unit == COORDINATOR_OU and common_name == COORDINATOR_IDENTITY:
        return Identity(common_name, coordinator=True)
    if unit == DEVICE_OU:
        try:
            return Identity(validate_device_id(common_name))
        except ValueError:
            return None
    return None


def topic_allowed(identity: Identity, topics: Topics, topic: str, action: Action) -> bool:
    """Whether `identity` may do `action` on `topic` (a subscription filter for SUBSCRIBE)."""
    if identity.coordinator:
        return topic == topics.base or topic.startswith(topics.base + "/")
    prefix = f"{topics.base}/devices/{identity.name}/"
    if not topic.startswith(prefix):
        return False
    channel = topic[len(prefix) :]
    if action is Action.PUBLISH:
        return channel in DEVICE_PUBLISHES
    return channel in DEVICE_RECEIVES


def mosquitto_acl(topics: Topics, coordinators: tuple[str, ...] = (COORDINATOR_IDENTITY,)) -> str:
    """The same rules as a Mosquitto `acl_file` (`%u` is the certificate's CN via `use_identity_as_username`)."""
    lines = ["# edgefleet broker rights (written by `edgefleet broker mosquitto-config`)", ""]
    lines.append("# every device: its own channels only (patterns apply to every client)")
    lines += [f"pattern write {topics.base}/devices/%u/{channel}" for channel in DEVICE_PUBLISHES]
    lines += [f"pattern read {topics.base}/devices/%u/{channel}" for channel in DEVICE_RECEIVES]
    for name in coordinators:
        lines += ["", f"user {name}", f"topic readwrite {topics.base}/#"]
    return "\n".join(lines) + "\n"
