"""Inbound messages decoded by pydantic-core in one pass, with `protocol.codec.decode`'s verdict on every payload.

`decode` parses with `json.loads` and then validates the Python objects: two passes, the first building dicts and
strings that the second copies (~12 µs for a telemetry window with sketches). `decode_message` validates the JSON
bytes directly in Rust (`model_validate_json`, ~7 µs) in strict mode, where an integer must be a JSON integer:
exactly the check `decode` makes of `schema_version` (not a boolean, a float or a string), while any other field
that only lax mode accepts makes it fail. Whatever the fast path cannot accept (strict mode refused, the schema
version missing or not this side's, a payload not plain ASCII, too large) is decided by `decode` itself, so the
verdict (the message, or `MalformedMessageError` with its reason) is always `decode`'s.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import ValidationError

from protocol.codec import MAX_PAYLOAD_BYTES, decode
from protocol.messages import SCHEMA_VERSION, Message

__all__ = ["decode_message"]

M = TypeVar("M", bound=Message)


def decode_message(kind: type[M], payload: bytes) -> M:
    """`protocol.codec.decode(kind, payload)`, validating `payload` in one pass whenever that gives the same answer."""
    # Plain ASCII: `json.loads` would refuse invalid UTF-8 (and read UTF-16), where the Rust parser need not agree.
    if len(payload) <= MAX_PAYLOAD_BYTES and payload.isascii():
        try:
            message = kind.model_validate_json(payload, strict=True)
        except ValidationError:
            pass  # maybe only lax mode accepts it, or it is malformed: `decode` says which, and why
        else:
            if "schema_version" in message.model_fields_set and message.schema_version == SCHEMA_VERSION:
                return message
    return decode(kind, payload)
