"""Structured log lines (one JSON object per line, `protocol.logfmt`'s format) for the daemon."""

from __future__ import annotations

import logging

from protocol.logfmt import JsonFormatter

__all__ = ["configure_logging"]


def configure_logging(level: str = "info", *, json_lines: bool = True) -> None:
    """Send log records to stderr, as JSON lines or as plain text."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
