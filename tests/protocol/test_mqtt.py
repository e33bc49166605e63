"""Broker URLs as both the coordinator and the agent read them: one parser, one refusal message."""

from __future__ import annotations

import pytest

from protocol.errors import BrokerUrlError
from protocol.mqtt import BrokerAddress, parse_mqtt_url, parse_mqtt_urls, redact_mqtt_url, strip_mqtt_credentials


def test_plain_url_with_a_port_is_a_plain_connection() -> None:
    assert parse_mqtt_url("mqtt://127.0.0.1:1884") == BrokerAddress(host="127.0.0.1", port=1884, tls=False)


def test_mqtts_url_uses_tls_on_8883_with_unquoted_credentials() -> None:
    assert parse_mqtt_url("mqtts://u:p%40ss@broker") == BrokerAddress(
        host="broker", port=8883, tls=True, username="u", password="p@ss"
    )


def test_tcp_url_without_a_port_uses_1883() -> None:
    address = parse_mqtt_url("tcp://h")
    assert (address.host, address.port, address.tls) == ("h", 1883, False)


def test_http_url_is_refused_with_the_expected_shape() -> None:
    with pytest.raises(BrokerUrlError, match="mqtt://host:port"):
        parse_mqtt_url("http://broker:1883")


def test_url_with_an_invalid_port_is_refused() -> None:
    with pytest.raises(BrokerUrlError, match="invalid port"):
        parse_mqtt_url("mqtt://broker:99999")


def test_refusal_does_not_leak_the_password() -> None:
    with pytest.raises(BrokerUrlError) as info:
        parse_mqtt_url("http://u:secret@broker:1883")
    assert "secret" not in str(info.value)


def test_redacted_url_hides_the_password_and_keeps_the_rest() -> None:
    redacted = redact_mqtt_url("mqtts://user:s3cret@broker.example:8883")
    assert "s3cret" not in redacted
    assert redacted == "mqtts://user:***@broker.example:8883"
    assert redact_mqtt_url("mqtt://broker:1883") == "mqtt://broker:1883"


def test_every_url_of_a_broker_list_is_redacted() -> None:
    urls = "mqtts://a:one@node-1:8883,mqtts://node-2:8883,mqtts://b:two@node-3"
    assert redact_mqtt_url(urls) == "mqtts://a:***@node-1:8883,mqtts://node-2:8883,mqtts://b:***@node-3"


def test_devices_are_told_a_broker_list_without_any_credentials() -> None:
    urls = "mqtt://a:one@node-1:1883,mqtt://node-2:1884,mqtt://b@node-3"
    assert strip_mqtt_credentials(urls) == "mqtt://node-1:1883,mqtt://node-2:1884,mqtt://node-3"


def test_mixing_tls_and_plain_brokers_is_refused_without_leaking_a_password() -> None:
    with pytest.raises(BrokerUrlError, match="mix TLS") as info:
        parse_mqtt_urls("mqtts://u:secret@node-1,mqtt://v:hidden@node-2")
    assert "secret" not in str(info.value) and "hidden" not in str(info.value)
