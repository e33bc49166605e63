"""A Grid that only sees the run's allowed nodes: the ServerApp never samples or messages any other SuperNode.

Every SuperNode connected to the SuperLink is in Flower's grid; a run targets the devices its selector chose
(`node-ids`). Strategies sample from `get_node_ids()`, so restricting that (and refusing a message addressed to
any other node, in case a strategy built one anyway) keeps the run on its cohort. A phase without an explicit
timeout (Flower's legacy workflows) gets the run's `round-timeout`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

__all__ = ["AllowedGrid", "NotEnoughNodesError"]


class NotEnoughNodesError(RuntimeError):
    """Fewer allowed nodes are connected than the run needs (after waiting `round-timeout`)."""


class AllowedGrid(Grid):
    """The run's grid restricted to `allowed` node ids."""

    def __init__(self, grid: Grid, allowed: Iterable[int], *, default_timeout: float, poll: float = 1.0) -> None:
        self._grid = grid
        self.allowed = frozenset(int(n) for n in allowed)
        self.default_timeout = default_timeout
        self._poll = poll
        self.trouble: dict[str, str] = {}

    # -- the restriction ---------------------------------------------------------------------------------------

    def get_node_ids(self) -> Iterable[int]:
        """The allowed nodes that are connected now."""
        return [n for n in self._grid.get_node_ids() if n in self.allowed]

    def wait_for_nodes(self, needed: int, timeout: float, *, what: str) -> list[int]:
        """The connected allowed nodes once at least `needed` are; `NotEnoughNodesError` after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            connected = list(self.get_node_ids())
            if len(connected) >= needed:
                return connected
            if time.monotonic() >= deadline:
                raise NotEnoughNodesError(
                    f"only {len(connected)} of the {needed} required nodes are connected for {what} after waiting "
                    f"{timeout:g} s (allowed: {', '.join(str(n) for n in sorted(self.allowed))}; connected: "
                    f"{', '.join(str(n) for n in sorted(connected)) or 'none'})"
                )
            time.sleep(self._poll)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push messages, refusing any addressed to a node outside the run."""
        return self._grid.push_messages(self._checked(messages))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Send and wait for replies, at most `timeout` (default: the run's round-timeout) seconds.

        Nodes that answered with an error or not at all are noted in `trouble` (node id → reason), which tells
        why a multi-stage protocol (SecAgg+) stopped when its workflow only logs it.
        """
        sent = self._checked(messages)
        replies = list(self._grid.send_and_receive(sent, timeout=self.default_timeout if timeout is None else timeout))
        answered = {m.metadata.src_node_id for m in replies}
        for msg in replies:
            if msg.has_error():
                self.trouble[str(msg.metadata.src_node_id)] = str(msg.error.reason)
        for msg in sent:
            if msg.metadata.dst_node_id not in answered:
                self.trouble[str(msg.metadata.dst_node_id)] = "no answer in time"
        return replies

    def _checked(self, messages: Iterable[Message]) -> list[Message]:
        checked = list(messages)
        outside = sorted({m.metadata.dst_node_id for m in checked} - self.allowed)
        if outside:
            raise RuntimeError(f"refusing to message nodes outside the run's node-ids: {outside}")
        return checked

    # -- plain delegation --------------------------------------------------------------------------------------

    def set_run(self, run: Any) -> None:
        """Delegate to the real grid."""
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        """The run this grid operates in."""
        return self._grid.run

    def create_message(
        self, content: Any, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        """Delegate to the real grid."""
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegate to the real grid."""
        return self._grid.pull_messages(message_ids)
