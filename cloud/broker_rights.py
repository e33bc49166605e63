"""Who may do what on the broker: one set of rules for the embedded broker's plugin and Mosquitto's ACL file.

A device (client certificate with OU `device`, CN = its id) may publish only its own reported state, events
and telemetry, and subscribe to and receive only its own desired state and telemetry acknowledgements. The
coordinator (OU `coordinator`, CN `COORDINATOR_IDENTITY`) may do everything under the topic base, and so may
each replica of a replicated coordinator, under a CN of its own (`replica_identity`: `edgefleet:coordinator.<name>`),
because Mosquitto makes the CN the client id and replicas sharing one would take each other's session over.
No device id can spell a coordinator's CN (device ids have no `:`). Nobody else may connect. Pure: no IO.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from protocol.errors import TopicError
from protocol.identity import COORDINATOR_IDENTITY, COORDINATOR_OU, DEVICE_OU
from protocol.topics import Topics, validate_device_id

__all__ = [
    "DEVICE_PUBLISHES",
    "DEVICE_RECEIVES",
    "REPLICA_NAME_MAX",
    "Action",
    "Identity",
    "identity_of",
    "mosquitto_acl",
    "replica_identity",
    "topic_allowed",
    "validate_replica_name",
]

DEVICE_PUBLISHES = ("reported", "events", "telemetry")
DEVICE_RECEIVES = ("desired", "ack")

_REPLICA_PREFIX = f"{COORDINATOR_IDENTITY}."
_REPLICA_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_CN_MAX = 64  # X.509's upper bound on a common name (RFC 5280 ub-common-name); `cryptography` enforces it
REPLICA_NAME_MAX = _CN_MAX - len(_REPLICA_PREFIX)  # the longest replica name whose CN still fits


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


def validate_replica_name(replica: str) -> str:
    """Return `replica` if it can name a coordinator replica (a lease holder, a file name, a CN), else `ValueError`."""
    if not _REPLICA_NAME_RE.fullmatch(replica):  # fullmatch: `$` would let a trailing newline into the ACL
        raise ValueError(
            f"invalid replica name {replica!r}: use 1-100 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return replica


def replica_identity(replica: str) -> str:
    """The CN of replica `replica`'s broker certificate (`edgefleet:coordinator.<replica>`): its Mosquitto user name
    and client id. `ValueError` for a name that is invalid or too long for a CN."""
    validate_replica_name(replica)
    if len(replica) > REPLICA_NAME_MAX:
        raise ValueError(
            f"replica name {replica!r} is {len(replica)} characters; a replicated coordinator's name goes into its "
            f"broker certificate ({_REPLICA_PREFIX}<name>, at most {_CN_MAX} characters): "
            f"give --replica a name of at most {REPLICA_NAME_MAX}"
        )
    return _REPLICA_PREFIX + replica


def _is_replica_identity(common_name: str) -> bool:
    if not common_name.startswith(_REPLICA_PREFIX):
        return False
    try:
        replica_identity(common_name[len(_REPLICA_PREFIX) :])
    except ValueError:
        return False
    return True


def identity_of(common_name: str, unit: str) -> Identity | None:
    """The identity a certificate's CN and OU give, or None when it is neither a device nor a coordinator (the
    coordinator's own CN or one of its replicas')."""
    if unit == COORDINATOR_OU and (common_name == COORDINATOR_IDENTITY or _is_replica_identity(common_name)):
        return Identity(common_name, coordinator=True)
    if unit == DEVICE_OU:
        try:
            return Identity(validate_device_id(common_name))
        except TopicError:  # not a device id (a CA of this fleet never issues one): nobody
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
    """The same rules as a Mosquitto `acl_file` (`%u` is the certificate's CN via `use_identity_as_username`);
    `coordinators` are the CNs with every right (the coordinator's, its replicas': `replica_identity`)."""
    lines = ["# edgefleet broker rights (written by `edgefleet broker mosquitto-config`)", ""]
    lines.append("# every device: its own channels only (patterns apply to every client)")
    lines += [f"pattern write {topics.base}/devices/%u/{channel}" for channel in DEVICE_PUBLISHES]
    lines += [f"pattern read {topics.base}/devices/%u/{channel}" for channel in DEVICE_RECEIVES]
    for name in coordinators:
        lines += ["", f"user {name}", f"topic readwrite {topics.base}/#"]
    return "\n".join(lines) + "\n"
