"""The real agent, SIGKILLed when its update reaches a chosen phase: power loss on demand.

    python -m simulators.faulty_agent --config agent.toml --kill-at switching
    python -m simulators.faulty_agent --config agent.toml --kill-at downloading --after-bytes 4096

It runs `agent.Agent` unchanged, with an `agent.update.UpdateHooks` that kills the process right after
the transition into `--kill-at` is on disk (before that phase's step runs). With `--after-bytes`, the
kill waits until the download's `.part` file holds that many bytes (a cut mid-download; pair it with a
slow artifact server). Exit codes: killed by SIGKILL (-9 to a parent), 0 when the update finished or
failed without reaching the phase, 2 for a bad configuration, 4 when `--timeout` passed first.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from agent import Agent, ConfigError, load_config
from agent.update import UpdateHooks, UpdateState
from protocol import UpdatePhase

__all__ = ["KillAt", "main"]

log = logging.getLogger("simulators.faulty_agent")

EXIT_CONFIG = 2
EXIT_NOT_REACHED = 4


def sigkill_self() -> None:
    """What a power cut does to the process: no cleanup, no flush, no last word."""
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(UpdateHooks):
    """Kills the process when the update enters `phase` (optionally once the download holds `after_bytes`)."""

    def __init__(
        self,
        phase: UpdatePhase,
        *,
        downloads: Path,
        after_bytes: int | None = None,
        kill: Callable[[], None] = sigkill_self,
    ) -> None:
        self.phase = phase
        self.downloads = downloads
        self.after_bytes = after_bytes
        self.kill = kill
        self.settled = threading.Event()  # the update ended (active, failed, rolled back) without the kill

    def on_transition(self, old: UpdateState, new: UpdateState) -> None:
        """Kill at the chosen phase; note when the update ends without reaching it."""
        if new.phase is self.phase:
            if self.after_bytes is None:
                self.kill()
            else:
                threading.Thread(target=self._kill_after_bytes, name="kill-after-bytes", daemon=True).start()
        elif new.phase in (UpdatePhase.ACTIVE, UpdatePhase.FAILED, UpdatePhase.ROLLED_BACK):
            self.settled.set()

    def _kill_after_bytes(self) -> None:
        assert self.after_bytes is not None
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline:
            sizes = [p.stat().st_size for p in self.downloads.glob("*.part") if p.exists()]
            if sizes and max(sizes) >= self.after_bytes:
                self.kill()
            time.sleep(0.005)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulators.faulty_agent", description=__doc__.split("\n")[0])
    parser.add_argument("--config", "-c", type=Path, required=True, help="the agent's TOML configuration")
    parser.add_argument(
        "--kill-at", required=True, choices=[p.value for p in UpdatePhase], help="SIGKILL on entering this phase"
    )
    parser.add_argument("--after-bytes", type=int, help="with downloading: kill once the .part holds this many bytes")
    parser.add_argument("--timeout", type=float, default=60.0, help="give up (exit 4) after this many seconds")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent until it is killed at the chosen phase, its update settles, or the timeout passes."""
    from agent._logging import configure_logging

    args = _parser().parse_args(argv)
    configure_logging(args.log_level, json_lines=False)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"faulty_agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    hooks = KillAt(UpdatePhase(args.kill_at), downloads=config.data_dir / "downloads", after_bytes=args.after_bytes)
    agent = Agent(config, hooks=hooks)
    agent.start()
    try:
        if hooks.settled.wait(args.timeout):
            print(f"faulty_agent: the update settled without reaching {args.kill_at}", file=sys.stderr)
            return 0
        print(f"faulty_agent: {args.kill_at} not reached within {args.timeout:g}s", file=sys.stderr)
        return EXIT_NOT_REACHED
    finally:
        agent.stop()


if __name__ == "__main__":
    sys.exit(main())
