"""Structured log lines (`key=value`, or JSON; `protocol.logfmt`) for the coordinator process."""

from __future__ import annotations

import logging
import sys

from protocol.logfmt import JsonFormatter, KeyValueFormatter

__all__ = ["configure_logging"]


def configure_logging(*, level: str = "INFO", json_lines: bool = False) -> None:
    """Send logs to stderr as key=value (or JSON) lines; quieten chatty libraries."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # alembic logs its set-up at INFO on every start; `cloud.db` logs the one line that matters (from, to).
    for noisy in ("alembic", "amqtt", "transitions", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
