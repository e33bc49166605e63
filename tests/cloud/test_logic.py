"""Pure decisions of the coordinator, in table form: message classification, targets, statuses, summaries."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from cloud.bridge import Decoded, Rejected, broker_address, classify
from cloud.errors import ConfigurationError
from cloud.models import Device, TargetStatus, TelemetryRecord
from cloud.services.deployments import deployment_status, select_devices
from cloud.services.devices import target_status_for_phase
from cloud.telemetry.summary import summarise
from protocol.codec import encode
from protocol.messages import ReportedState, UpdatePhase
from protocol.mqtt import BrokerAddress
from protocol.telemetry import latency_histogram
from protocol.topics import Channel, Topics

TOPICS = Topics("t/edgefleet/v1")
NO_DEVICE = json.dumps({"schema_version": 1}).encode()
GOOD = encode(ReportedState(device_id="d1"))


@pytest.mark.parametrize(
    ("topic", "payload", "expected"),
    [
        ("t/edgefleet/v1/devices/d1/reported", GOOD, "reported"),
        ("t/edgefleet/v1/devices/d1/reported", b"{", "rejected:reported:not JSON"),
        ("t/edgefleet/v1/devices/d1/reported", json.dumps({"schema_version": 2}).encode(), "rejected:reported:schema"),
        (
            "t/edgefleet/v1/devices/d1/reported",
            json.dumps({"schema_version": 1}).encode(),
            "rejected:reported:device_id",
        ),
        ("t/edgefleet/v1/devices/d2/reported", GOOD, "rejected:reported:does not match"),
        ("t/edgefleet/v1/devices/d1/desired", GOOD, "rejected:desired:does not accept"),
        ("t/edgefleet/v1/devices/d 1/reported", GOOD, "rejected:unknown:invalid device id"),
        ("other/devices/d1/reported", GOOD, "rejected:unknown:not under"),
    ],
)
def test_classify_accepts_only_valid_messages_on_their_own_topic(topic: str, payload: bytes, expected: str) -> None:
    verdict = classify(TOPICS, topic, payload)
    if isinstance(verdict, Decoded):
        assert verdict.channel is Channel(expected)
    else:
        assert isinstance(verdict, Rejected)
        _, channel, reason = expected.split(":", 2)
        assert verdict.channel == channel and reason in verdict.reason


@pytest.mark.parametrize(
    ("phase", "status"),
    [
        (UpdatePhase.IDLE, TargetStatus.PENDING),
        (UpdatePhase.DOWNLOADING, TargetStatus.IN_PROGRESS),
        (UpdatePhase.WARMING_UP, TargetStatus.IN_PROGRESS),
        (UpdatePhase.ACTIVE, TargetStatus.SUCCEEDED),
        (UpdatePhase.FAILED, TargetStatus.FAILED),
    ],
)
def test_target_status_follows_the_reported_phase(phase: UpdatePhase, status: TargetStatus) -> None:
    assert target_status_for_phase(phase) is status


@pytest.mark.parametrize(
    ("statuses", "overall"),
    [
        (["succeeded", "pending"], "in_progress"),
        (["failed", "in_progress"], "in_progress"),
        (["failed", "succeeded"], "failed"),
        (["succeeded", "superseded"], "succeeded"),
    ],
)
def test_deployment_status_summarises_targets(statuses: list[str], overall: str) -> None:
    assert deployment_status(statuses) == overall


def test_tag_selection_requires_every_tag() -> None:
    devices = [Device(id="a", tags={"site": "lab", "hw": "pi"}), Device(id="b", tags={"site": "lab"})]
    assert [d.id for d in select_devices(devices, device_ids=None, tags={"site": "lab", "hw": "pi"})] == ["a"]
    assert [d.id for d in select_devices(devices, device_ids=["b", "zz"], tags=None)] == ["b"]


def test_summary_merges_histograms_across_windows() -> None:
    when = datetime(2025, 1, 1, tzinfo=UTC)

    def window(device_id: str, seq: int, latencies: list[float]) -> TelemetryRecord:
        return TelemetryRecord(
            device_id=device_id,
            seq=seq,
            window_start=when,
            window_end=when,
            inference_count=len(latencies),
            error_count=0,
            latency_histogram=latency_histogram(latencies),
        )

    devices = [Device(id="a", status="online"), Device(id="b", status="offline")]
    windows = [window("a", 0, [0.4] * 90), window("a", 1, [40.0] * 10), window("b", 0, [3000.0] * 2)]
    summary = summarise(devices, windows)
    lines = {line.device_id: line for line in summary.devices}
    assert (lines["a"].inference_count, lines["a"].latency_p50_ms, lines["a"].latency_p95_ms) == (100, 0.5, 50)
    assert lines["b"].latency_p50_ms == 5000
    assert (summary.inference_count, summary.online_count, summary.device_count) == (102, 1, 2)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://127.0.0.1:1884", BrokerAddress("127.0.0.1", 1884, False, None, None)),
        ("mqtts://u:p%40ss@broker", BrokerAddress("broker", 8883, True, "u", "p@ss")),
        ("tcp://h", BrokerAddress("h", 1883, False, None, None)),
    ],
)
def test_parses_mqtt_urls(url: str, expected: BrokerAddress) -> None:
    assert broker_address(url) == expected


def test_rejects_an_mqtt_url_of_another_scheme() -> None:
    with pytest.raises(ConfigurationError, match="mqtt://host:port"):
        broker_address("http://broker:1883")
