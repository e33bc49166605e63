"""Decoding untrusted payloads: every malformed shape gives a clear `MalformedMessageError`."""

from __future__ import annotations

import json

import pytest

from protocol import (
    SCHEMA_VERSION,
    ArtifactRef,
    DesiredState,
    MalformedMessageError,
    ModelSpec,
    ReportedState,
    TelemetryAck,
    TelemetryWindow,
    TensorSpec,
    UnsupportedSchemaVersionError,
    decode,
    encode,
    utcnow,
)

SHA = "a" * 64


def desired() -> DesiredState:
    artifact = ArtifactRef(url="http://127.0.0.1:8080/api/v1/artifacts/" + SHA, sha256=SHA, size=10)
    spec = ModelSpec(
        name="digits",
        version="1.0",
        artifact=artifact,
        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 64])],
    )
    return DesiredState(device_id="dev-1", generation=3, model=spec)


def test_desired_state_round_trips_through_the_wire_form() -> None:
    message = desired()
    assert decode(DesiredState, encode(message)) == message


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe not utf8", "not JSON"),
        (b"{not json", "not JSON"),
        (b"[1, 2]", "expected an object"),
        (b'{"device_id": "dev-1"}', "schema_version"),
        (b'{"schema_version": "1", "device_id": "dev-1"}', "schema_version"),
        (b'{"schema_version": true, "device_id": "dev-1"}', "schema_version"),
        (json.dumps({"schema_version": SCHEMA_VERSION, "device_id": "dev-1"}).encode(), "generation"),
        (json.dumps({"schema_version": SCHEMA_VERSION, "device_id": "a/b#", "generation": 1}).encode(), "device_id"),
        (json.dumps({"schema_version": SCHEMA_VERSION, "device_id": "d", "generation": -1}).encode(), "generation"),
    ],
)
def test_rejects_malformed_desired_state_with_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessageError, match=reason):
        decode(DesiredState, payload)


def test_rejects_unknown_schema_version_as_unsupported() -> None:
    payload = encode(desired()).replace(b'"schema_version":1', b'"schema_version":99')
    with pytest.raises(UnsupportedSchemaVersionError, match="99"):
        decode(DesiredState, payload)


def test_rejects_artifact_digest_that_is_not_sha256_hex() -> None:
    data = json.loads(encode(desired()))
    data["model"]["artifact"]["sha256"] = "../../etc/passwd"
    with pytest.raises(MalformedMessageError, match="sha256"):
        decode(DesiredState, json.dumps(data))


def test_rejects_oversized_payload() -> None:
    with pytest.raises(MalformedMessageError, match="exceeds"):
        decode(ReportedState, b" " * (300 * 1024))


def test_ignores_unknown_fields_from_newer_peers() -> None:
    data = json.loads(encode(ReportedState(device_id="dev-1")))
    data["field_from_the_future"] = {"x": 1}
    assert decode(ReportedState, json.dumps(data)).device_id == "dev-1"


def test_last_will_payload_decodes_as_offline_report() -> None:
    will = b'{"schema_version": 1, "device_id": "dev-9", "status": "offline"}'
    report = decode(ReportedState, will)
    assert report.status == "offline"
    assert report.active_model is None


def test_rejects_negative_telemetry_counts() -> None:
    now = utcnow().isoformat()
    payload = json.dumps(
        {
            "schema_version": 1,
            "device_id": "dev-1",
            "seq": 0,
            "window_start": now,
            "window_end": now,
            "inference_count": -5,
            "error_count": 0,
        }
    )
    with pytest.raises(MalformedMessageError, match="inference_count"):
        decode(TelemetryWindow, payload)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"stored_seq": 9, "max_seq": 3}, "stored_seq 9 is above max_seq 3"),
        ({"stored_seq": 3}, "stored_seq is set but max_seq is null"),
        ({"max_seq": -1}, "max_seq"),
    ],
)
def test_rejects_telemetry_ack_that_contradicts_itself(fields: dict[str, int], reason: str) -> None:
    payload = json.dumps({"schema_version": 1, "device_id": "dev-1", **fields}).encode()
    with pytest.raises(MalformedMessageError, match=reason):
        decode(TelemetryAck, payload)


def test_telemetry_ack_of_nothing_stored_round_trips() -> None:
    ack = TelemetryAck(device_id="dev-1")
    assert decode(TelemetryAck, encode(ack)) == ack and ack.max_seq is None and ack.stored_seq is None
