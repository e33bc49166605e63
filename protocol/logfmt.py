"""The log line format of every edgefleet process: JSON objects or `key=value` lines with the same keys.

Devices and the coordinator log alike, so one collector parses both: `ts` (UTC, milliseconds), `level`,
`logger`, `msg`, and `exc` when an exception is attached.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

__all__ = ["JsonFormatter", "KeyValueFormatter", "log_fields"]


def log_fields(record: logging.LogRecord, formatter: logging.Formatter) -> dict[str, Any]:
    """The fields of one log line."""
    fields: dict[str, Any] = {
        "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    if record.exc_info:
        fields["exc"] = formatter.formatException(record.exc_info)
    return fields


class JsonFormatter(logging.Formatter):
    """`{"ts": ..., "level": ..., "logger": ..., "msg": ..., "exc": ...}` per record."""

    def format(self, record: logging.LogRecord) -> str:
        """One JSON line for `record`."""
        return json.dumps(log_fields(record, self), ensure_ascii=False)


class KeyValueFormatter(logging.Formatter):
    """`ts=... level=... logger=... msg="..."` per record (strings JSON-quoted)."""

    def format(self, record: logging.LogRecord) -> str:
        """One key=value line for `record`."""
        fields = log_fields(record, self)
        return " ".join(
            f"{key}={json.dumps(value) if key in ('msg', 'exc') else value}" for key, value in fields.items()
        )
