"""The bridge's one-pass decoding (`cloud.telemetry.decoding`) gives `protocol.codec.decode`'s verdict on every
payload: the same message, or a refusal with the same reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from cloud.telemetry.decoding import decode_message
from protocol.codec import MAX_PAYLOAD_BYTES, decode, encode
from protocol.errors import MalformedMessageError
from protocol.messages import DeviceEvent, ModelRef, ReportedState, TelemetryWindow

SENT = TelemetryWindow(
    device_id="edge-1",
    seq=3,
    prev_seq=2,
    window_start=datetime(2026, 12, 1, tzinfo=UTC),
    window_end=datetime(2026, 12, 1, 0, 0, 10, tzinfo=UTC),
    model=ModelRef(name="digits", version="1.0", sha256="a" * 64),
    inference_count=10,
    error_count=1,
    latency_histogram=[7, 2, 1],
    class_counts={"3": 10},
)


def variant(**changes: object) -> bytes:
    data = json.loads(encode(SENT)) | changes
    return json.dumps(data).encode()


def without(key: str) -> bytes:
    data = json.loads(encode(SENT))
    del data[key]
    return json.dumps(data).encode()


PAYLOADS = {
    "as an agent sends it": encode(SENT),
    "boolean schema version": variant(schema_version=True),
    "float schema version": variant(schema_version=1.0),
    "string schema version": variant(schema_version="1"),
    "missing schema version": without("schema_version"),
    "newer schema version": variant(schema_version=2),
    "lax-only values (a seq as a string, a count as a float)": variant(seq="3", inference_count=10.0),
    "non-ASCII class name": json.dumps(json.loads(encode(SENT)) | {"class_counts": {"chat é": 1}}).encode("utf-8"),
    "invalid UTF-8": encode(SENT).replace(b'"3":10', b'"\xff":10'),
    "UTF-16": json.dumps(json.loads(encode(SENT))).encode("utf-16"),
    "unknown field from a newer peer": variant(novelty={"a": 1}),
    "negative count": variant(error_count=-1),
    "prev_seq not below seq": variant(prev_seq=3),
    "not JSON": b"{not json",
    "a list": b"[1, 2]",
    "too large": encode(SENT)[:-1] + b',"pad":"' + b"x" * MAX_PAYLOAD_BYTES + b'"}',
}


def verdict(decoder: object, kind: type, payload: bytes) -> object:
    try:
        message = decoder(kind, payload)  # type: ignore[operator]
    except MalformedMessageError as exc:
        return (type(exc), str(exc))
    return message.model_dump(exclude={"reported_at"})  # a default made at decoding: now


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_one_pass_decoding_gives_decode_s_verdict(payload: bytes) -> None:
    assert verdict(decode_message, TelemetryWindow, payload) == verdict(decode, TelemetryWindow, payload)


def test_one_pass_decoding_refuses_a_boolean_schema_version_like_decode() -> None:
    with pytest.raises(MalformedMessageError, match="non-integer schema_version"):
        decode_message(TelemetryWindow, variant(schema_version=True))


@pytest.mark.parametrize("kind", [ReportedState, DeviceEvent])
def test_other_inbound_kinds_get_decode_s_verdict_too(kind: type) -> None:
    for payload in PAYLOADS.values():
        assert verdict(decode_message, kind, payload) == verdict(decode, kind, payload)
