"""Broker URLs as both sides write them: `mqtt://[user:pass@]host[:1883]` or `mqtts://...[:8883]`.

The coordinator's bridge and the device agent parse the same URLs with this one function; each wraps
`BrokerUrlError` into its own configuration error at its edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from protocol.errors import BrokerUrlError

__all__ = [
    "MQTT_SCHEMES",
    "TLS_SCHEMES",
    "BrokerAddress",
    "parse_mqtt_url",
    "redact_mqtt_url",
    "strip_mqtt_credentials",
]

MQTT_SCHEMES = frozenset({"mqtt", "tcp", "mqtts", "ssl"})
TLS_SCHEMES = frozenset({"mqtts", "ssl"})


@dataclass(frozen=True)
class BrokerAddress:
    """Where and how to connect to a broker."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None


def parse_mqtt_url(url: str) -> BrokerAddress:
    """The address in an `mqtt://`, `tcp://`, `mqtts://` or `ssl://` URL; `BrokerUrlError` for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in MQTT_SCHEMES or not parts.hostname:
        raise BrokerUrlError(f"MQTT URL {redact_mqtt_url(url)!r} must look like mqtt://host:port or mqtts://host:port")
    tls = parts.scheme in TLS_SCHEMES
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise BrokerUrlError(f"MQTT URL {redact_mqtt_url(url)!r} has an invalid port") from exc
    return BrokerAddress(
        host=parts.hostname,
        port=port,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


def redact_mqtt_url(url: str) -> str:
    """`url` without its password (for logs, messages and API answers)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


def strip_mqtt_credentials(url: str) -> str:
    """`url` without user name and password (what devices and API readers are told)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
