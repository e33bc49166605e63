"""Bookkeeping of a run's rounds, whatever Flower API ran them (pure apart from the progress file it appends to).

Each phase (train, evaluate) of each round ends in one progress line, and a phase in which fewer than
`min-nodes` nodes answered ends the run: `RoundFailedError` says which nodes did not answer and why, and the
ServerApp lets it propagate so that Flower marks the run `finished:failed` with that message.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .results import ResultDir

__all__ = ["Answer", "RoundBook", "RoundFailedError", "reason_text"]

_FLOWER_REASON = re.compile(r"^<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>$", re.DOTALL)


class RoundFailedError(RuntimeError):
    """Fewer nodes than `min-nodes` answered in a phase of a round."""


def reason_text(reason: str) -> str:
    """Flower's "<class 'ValueError'>:<'text'>" as "ValueError: text"."""
    match = _FLOWER_REASON.match(reason.strip())
    return f"{match.group(1)}: {match.group(2)}" if match else reason.strip()


@dataclass(frozen=True)
class Answer:
    """One node's answer in a phase: its metrics, or the reason it failed."""

    node: str
    metrics: Mapping[str, Any] | None = None
    error: str | None = None


@dataclass
class RoundBook:
    """Writes progress lines, keeps the metrics history and enforces `min-nodes`."""

    results: ResultDir
    min_nodes: int
    timeout: float
    history: dict[str, dict[str, dict[str, Any]]] = field(default_factory=lambda: {"train": {}, "evaluate": {}})
    nodes: set[str] = field(default_factory=set)
    _sent: dict[tuple[int, str], tuple[list[str], float]] = field(default_factory=dict)

    def sent(self, server_round: int, phase: str, node_ids: Iterable[Any]) -> None:
        """The nodes a phase's messages went to (its clock starts now)."""
        self._sent[(server_round, phase)] = ([str(n) for n in node_ids], time.monotonic())

    def require(self, server_round: int, phase: str, answers: list[Answer]) -> None:
        """Raise `RoundFailedError` (after writing the phase's line) when fewer than `min-nodes` answered."""
        ok = [a for a in answers if a.error is None]
        if len(ok) >= self.min_nodes:
            return
        line = self._line(server_round, phase, answers, None)
        self.results.progress(line)
        causes = [f"node {node}: {reason}" for node, reason in line["errors"].items()]
        causes += [f"node {node} did not answer within {self.timeout:g} s" for node in line["missing"]]
        raise RoundFailedError(
            f"only {len(ok)} of the {self.min_nodes} required nodes answered in round {server_round} ({phase})"
            + (f": {'; '.join(causes)}" if causes else "")
        )

    def record(self, server_round: int, phase: str, answers: list[Answer], metrics: Mapping[str, Any] | None) -> None:
        """Write the phase's progress line and keep its aggregated metrics."""
        line = self._line(server_round, phase, answers, metrics)
        self.results.progress(line)
        self.history[phase][str(server_round)] = line["metrics"]
        self.nodes |= set(line["nodes"])

    def _line(
        self, server_round: int, phase: str, answers: list[Answer], metrics: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        sent, started = self._sent.get((server_round, phase), ([], time.monotonic()))
        ok = [a for a in answers if a.error is None]
        answered = {a.node for a in answers}
        aggregated = dict(metrics or {})
        if ok:
            aggregated["num-examples"] = sum(int((a.metrics or {}).get("num-examples", 0)) for a in ok)
        return {
            "round": server_round,
            "phase": phase,
            "replies": len(ok),
            "failures": len(answers) - len(ok) + len([n for n in sent if n not in answered]),
            "nodes": sorted(a.node for a in ok),
            "metrics": aggregated,
            "node_metrics": {a.node: dict(a.metrics or {}) for a in ok},
            "errors": {a.node: a.error for a in answers if a.error is not None},
            "missing": sorted(n for n in sent if n not in answered),
            "seconds": round(time.monotonic() - started, 3),
            "time": time.time(),
        }
