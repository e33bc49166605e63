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
    "parse_mqtt_urls",
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


def parse_mqtt_urls(urls: str) -> tuple[BrokerAddress, ...]:
    """The addresses of a comma-separated list of broker URLs (one broker, or the nodes of a cluster), in order.

    A client has one TLS context, so the list may not mix `mqtt://` and `mqtts://`. A comma inside a password is
    written `%2C`.
    """
    addresses = tuple(parse_mqtt_url(url.strip()) for url in urls.split(",") if url.strip())
    if not addresses:
        raise BrokerUrlError("no MQTT URL given (expected mqtt://host:port, or several separated by commas)")
    if len({address.tls for address in addresses}) > 1:
        shown = redact_mqtt_url(urls)
        raise BrokerUrlError(
            f"MQTT URLs {shown!r} mix TLS (mqtts://) and plain TCP (mqtt://): list brokers of one kind"
        )
    return addresses


def redact_mqtt_url(url: str) -> str:
    """`url` without its password (for logs, messages and API answers); every URL of a comma-separated list."""
    return ",".join(_redact_one(one) for one in url.split(","))


def strip_mqtt_credentials(url: str) -> str:
    """`url` without user name and password (what devices and API readers are told); every URL of a list."""
    return ",".join(_strip_one(one) for one in url.split(","))


def _redact_one(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


def _strip_one(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
