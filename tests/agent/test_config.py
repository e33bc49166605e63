"""Agent configuration: TOML plus `EDGEFLEET_AGENT_*` overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import AgentConfig, ConfigError, load_config
from agent.credentials import resolve_broker
from agent.identity import DeviceIdentity
from protocol import DEFAULT_BASE


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_file_values_with_environment_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'device_id = "cam-1"\ndata_dir = "state"\nmqtt_url = "mqtt://broker:1883"\nhttp_port = 9000\n'
        '[tags]\nsite = "lab"\n',
    )
    env = {
        "EDGEFLEET_AGENT_HTTP_PORT": "disabled",
        "EDGEFLEET_AGENT_TAGS": "site=field,ring=canary",
        "EDGEFLEET_AGENT_TELEMETRY_INTERVAL_S": "2.5",
        "UNRELATED": "x",
    }
    config = load_config(path, env=env)
    assert config.device_id == "cam-1" and config.data_dir == tmp_path / "state"
    assert config.http_port is None and config.telemetry_interval_s == 2.5
    assert config.tags == {"site": "field", "ring": "canary"}
    assert config.topic_base is None and config.intra_op_threads == 1


def test_defaults() -> None:
    config = AgentConfig(device_id="d1", data_dir=Path("/tmp/x"), mqtt_url="mqtt://h:1883")
    assert (config.http_host, config.http_port, config.telemetry_interval_s) == ("127.0.0.1", 8500, 10.0)


@pytest.mark.parametrize(
    ("text", "env", "fragments"),
    [
        ('device_id = "no spaces"\ndata_dir = "d"\nmqtt_url = "mqtt://h"\n', {}, ["'device_id'", "invalid device id"]),
        ('device_id = "d"\ndata_dir = "d"\nmqtt_url = "mqtt://h"\nhttp_prot = 1\n', {}, ["'http_prot'", "unknown key"]),
        ('device_id = "d"\ndata_dir = "d"\nmqtt_url = "mqtt://h"\nhttp_port = 70000\n', {}, ["'http_port'"]),
        ('device_id = "d"\ndata_dir = "d"\n', {}, ["mqtt_url", "coordinator_url"]),
        ('device_id = "d"\ndata_dir = "d"\nmqtt_url = "h"\n', {}, ["'mqtt_url'", "not a URL"]),
        ("device_id = \n", {}, ["not valid TOML"]),
        (
            'device_id = "d"\ndata_dir = "d"\nmqtt_url = "mqtt://h"\n',
            {"EDGEFLEET_AGENT_TELEMETRY_INTERVAL_S": "soon"},
            ["EDGEFLEET_AGENT_TELEMETRY_INTERVAL_S", "'telemetry_interval_s'"],
        ),
        (
            'device_id = "d"\ndata_dir = "d"\nmqtt_url = "mqtt://h"\n',
            {"EDGEFLEET_AGENT_COLOUR": "x"},
            ["unknown setting"],
        ),
    ],
    ids=[
        "bad_device_id",
        "typo_key",
        "port_range",
        "no_broker",
        "url_without_scheme",
        "bad_toml",
        "bad_env",
        "env_typo",
    ],
)
def test_bad_configuration_says_which_key_and_why(
    tmp_path: Path, text: str, env: dict[str, str], fragments: list[str]
) -> None:
    with pytest.raises(ConfigError) as exc_info:
        load_config(write(tmp_path, text), env=env)
    for fragment in fragments:
        assert fragment in str(exc_info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml", env={})


def test_configured_broker_needs_no_coordinator(tmp_path: Path) -> None:
    config = AgentConfig(device_id="d1", data_dir=tmp_path, mqtt_url="mqtt://h:1883")
    assert resolve_broker(config, None) == ("mqtt://h:1883", DEFAULT_BASE)


def identity(tmp_path: Path, device_id: str = "d1") -> DeviceIdentity:
    return DeviceIdentity(
        directory=tmp_path / "identity",
        device_id=device_id,
        broker_url="mqtts://10.0.0.5:8883",
        topic_base="site/edgefleet/v1",
        coordinator_url="http://10.0.0.5:8080",
        tags={},
    )


def test_broker_address_and_topic_base_come_from_the_enrolment(tmp_path: Path) -> None:
    config = AgentConfig(device_id="d1", data_dir=tmp_path, coordinator_url="http://10.0.0.5:8080")
    assert resolve_broker(config, identity(tmp_path)) == ("mqtts://10.0.0.5:8883", "site/edgefleet/v1")
    pinned = AgentConfig(device_id="d1", data_dir=tmp_path, coordinator_url="http://c:1", topic_base="mine/v1")
    assert resolve_broker(pinned, identity(tmp_path)) == ("mqtts://10.0.0.5:8883", "mine/v1")


def test_device_that_never_enrolled_is_told_how_to(tmp_path: Path) -> None:
    config = AgentConfig(device_id="d1", data_dir=tmp_path, coordinator_url="http://10.0.0.5:8080")
    with pytest.raises(ConfigError, match="not enrolled: run `edgefleet-agent enroll"):
        resolve_broker(config, None)


def test_config_cannot_claim_another_enrolled_id(tmp_path: Path) -> None:
    config = AgentConfig(device_id="d2", data_dir=tmp_path, coordinator_url="http://10.0.0.5:8080")
    with pytest.raises(ConfigError, match="differs from the enrolled identity 'd1'"):
        resolve_broker(config, identity(tmp_path, "d1"))


def test_unreachable_coordinator_is_a_transport_error(tmp_path: Path) -> None:
    from agent import TransportError
    from agent.identity import enrol
    from tests.services import free_port

    with pytest.raises(TransportError, match="cannot reach the coordinator"):
        enrol(data_dir=tmp_path, coordinator_url=f"http://127.0.0.1:{free_port()}", device_id="d1", token="t")
    assert not (tmp_path / "identity" / "device.key").exists(), "no half identity left behind"


def test_broker_url_that_is_not_mqtt_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    from agent import Agent

    config = AgentConfig(device_id="d1", data_dir=tmp_path / "data", mqtt_url="http://u:secret@broker:1883")
    with pytest.raises(ConfigError, match=r"mqtt_url: .*mqtt://host:port") as exc_info:
        Agent(config).start()
    assert "secret" not in str(exc_info.value)
    assert not (tmp_path / "data").exists()  # refused before anything was written
