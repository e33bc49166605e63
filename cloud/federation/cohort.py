"""Which devices train in a federated run, and why the others do not. Pure: device rows in, a cohort out.

A device trains when it carries every selector tag and is enrolled, online, running exactly the parent version,
not in the middle of an update, not in another live run, and registered with the SuperLink (a live SuperNode
identity). Every other matching device is counted under the first reason that excludes it, so a shortfall reads
as one line: "4 devices match site=a: 1 is updating, 1 runs digits-cnn:0.9; 2 eligible < --min-nodes 3".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "IN_FLIGHT_PHASES",
    "Cohort",
    "CohortDevice",
    "exclusion",
    "select_cohort",
    "selector_text",
    "shortfall",
]

# Update phases of a device still on its way to a desired generation (agent/update/machine.py).
IN_FLIGHT_PHASES = frozenset(
    {
        "downloading",
        "verifying",
        "staging",
        "loading",
        "warming_up",
        "health_check",
        "shadow",
        "switching",
        "committing",
    }
)


@dataclass(frozen=True)
class CohortDevice:
    """What the cohort rules read of a device row."""

    id: str
    tags: Mapping[str, str] = field(default_factory=dict)
    enrolment: str = "enrolled"
    status: str = "online"
    model_name: str | None = None
    model_version: str | None = None
    desired_generation: int = 0
    reported_generation: int | None = None
    update_phase: str | None = None


@dataclass(frozen=True)
class Cohort:
    """The devices that match the selector, those eligible (device id → SuperNode id), and why the rest are not."""

    matched: int
    eligible: dict[str, str]
    excluded: dict[str, list[str]]  # reason (singular form) → device ids, in the order reasons are checked


# (singular, plural) wording of each exclusion reason; "runs X" is built per version.
_REASONS = {
    "revoked": ("is revoked", "are revoked"),
    "pending": ("is not enrolled yet", "are not enrolled yet"),
    "offline": ("is offline", "are offline"),
    "unknown": ("is not heard from since the coordinator started", "are not heard from since the coordinator started"),
    "updating": ("is updating", "are updating"),
    "busy": ("is in another federated run", "are in another federated run"),
    "no_node": ("has no registered SuperNode", "have no registered SuperNode"),
}

# The order reasons are checked in (and shown in).
_RANK = {name: rank for rank, name in enumerate(("revoked", "pending", "offline", "unknown", "runs", "updating",
                                                 "busy", "no_node"))}  # fmt: skip


def _mid_update(device: CohortDevice) -> bool:
    """An update in flight: a phase on the way, or a desired generation the device has not reported yet."""
    if device.update_phase in IN_FLIGHT_PHASES:
        return True
    return device.desired_generation > 0 and device.reported_generation != device.desired_generation


def exclusion(
    device: CohortDevice, *, model: str, version: str, nodes: Mapping[str, str], busy: Mapping[str, int]
) -> str | None:
    """The first reason `device` cannot train `model:version` (a key of `_REASONS`, or `runs:X`); None: it can."""
    if device.enrolment != "enrolled":
        return "revoked" if device.enrolment == "revoked" else "pending"
    if device.status != "online":
        return "unknown" if device.status == "unknown" else "offline"
    if (device.model_name, device.model_version) != (model, version):
        running = f"{device.model_name}:{device.model_version}" if device.model_name else "no model"
        return f"runs:{running}"
    if _mid_update(device):
        return "updating"
    if device.id in busy:
        return "busy"
    if device.id not in nodes:
        return "no_node"
    return None


def select_cohort(
    devices: Iterable[CohortDevice],
    *,
    selector: Mapping[str, str],
    model: str,
    version: str,
    nodes: Mapping[str, str],
    busy: Mapping[str, int] | None = None,
) -> Cohort:
    """The cohort of a run of `model:version` over the devices carrying every `selector` tag.

    `nodes`: device id → SuperNode id of the devices registered with the SuperLink now; `busy`: device id → id of
    a live run it trains in. Decommissioned devices are not part of the fleet and are not counted at all.
    """
    eligible: dict[str, str] = {}
    excluded: dict[str, list[str]] = {}
    matched = 0
    for device in sorted(devices, key=lambda d: d.id):
        if device.enrolment == "decommissioned" or any(device.tags.get(k) != v for k, v in selector.items()):
            continue
        matched += 1
        reason = exclusion(device, model=model, version=version, nodes=nodes, busy=busy or {})
        if reason is None:
            eligible[device.id] = nodes[device.id]
        else:
            excluded.setdefault(reason, []).append(device.id)
    ordered = dict(sorted(excluded.items(), key=lambda item: _RANK.get(item[0].partition(":")[0], len(_RANK))))
    return Cohort(matched=matched, eligible=eligible, excluded=ordered)


def selector_text(selector: Mapping[str, str]) -> str:
    """`site=a,zone=2` (sorted), or `{}` for the whole fleet."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "{}"


def _wording(reason: str, count: int) -> str:
    if reason.startswith("runs:"):
        return f"{'runs' if count == 1 else 'run'} {reason.removeprefix('runs:')}"
    singular, plural = _REASONS[reason]
    return singular if count == 1 else plural


def shortfall(cohort: Cohort, *, selector: Mapping[str, str], min_nodes: int) -> str | None:
    """Why the cohort is too small for `min_nodes`, in one line counting each exclusion reason; None if it is not."""
    count = len(cohort.eligible)
    if count >= min_nodes:
        return None
    if cohort.matched == 0:
        return f"no device matches {selector_text(selector)}" if selector else "no device is in the fleet"
    one = cohort.matched == 1
    if selector:
        head = f"{cohort.matched} {'device matches' if one else 'devices match'} {selector_text(selector)}"
    else:
        head = f"{cohort.matched} {'device is' if one else 'devices are'} in the fleet"
    reasons = ", ".join(f"{len(ids)} {_wording(reason, len(ids))}" for reason, ids in cohort.excluded.items())
    return f"{head}{': ' + reasons if reasons else ''}; {count} eligible < --min-nodes {min_nodes}"
