"""Encoding and decoding of messages, with errors that say what is wrong with a payload."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import ValidationError

from protocol.errors import MalformedMessageError, UnsupportedSchemaVersionError
from protocol.messages import SCHEMA_VERSION, Message

M = TypeVar("M", bound=Message)

MAX_PAYLOAD_BYTES = 256 * 1024


def encode(message: Message) -> bytes:
    """Serialize a message to its JSON wire form."""
    return message.model_dump_json().encode()


def decode(kind: type[M], payload: bytes | bytearray | str) -> M:
    """Parse `payload` as a `kind` message; `MalformedMessageError` says why it is not one."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MalformedMessageError(f"{kind.__name__}: payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedMessageError(f"{kind.__name__}: payload is not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise MalformedMessageError(f"{kind.__name__}: payload is {type(data).__name__}, expected an object")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise MalformedMessageError(f"{kind.__name__}: missing or non-integer schema_version")
    if version != SCHEMA_VERSION:
        raise UnsupportedSchemaVersionError(
            f"{kind.__name__}: schema_version {version} is not supported (this side speaks {SCHEMA_VERSION})"
        )
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise MalformedMessageError(f"{kind.__name__}: {problems}") from exc
