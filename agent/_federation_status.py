"""What the device's Flower SuperNode is doing: `FederationStatus` (re-exported by `agent.federation`).

Apart from the supervisor so that an agent that is not federated, whose metrics and reports still say
`disabled`, never loads `agent.federation` (subprocess handling, the guard process, Flower's output parsing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["FederationStatus", "State"]

State = Literal["disabled", "waiting-for-superlink", "running", "restarting", "refused", "stopped"]


@dataclass(frozen=True)
class FederationStatus:
    """What the supervisor is doing: `state`, restarts so far, the last exit code and error, the node id."""

    state: State = "disabled"
    restarts: int = 0
    last_exit_code: int | None = None  # the process's exit status (Flower exits 1 on every error)
    last_flower_code: int | None = None  # Flower's own code from its output ("Exit Code: 305"), if it gave one
    last_error: str = ""
    superlink: str | None = None
    node_id: str | None = None
    pid: int | None = None  # of the guard, which leads the SuperNode's process group
