"""`Credentials`: one agent's fleet identity while it runs — where its broker is, its TLS, renewal, a moved broker.

The identity on disk (`agent.identity`) is the device's key and certificate and the URLs it enrolled with. While
the agent runs, the certificate is renewed in its last third (at start and every `certificate_check_s`), the TLS
context of the MQTT connection is reloaded with it, and a broker that stopped answering is looked up again at the
coordinator. An agent without an identity (an explicit `mqtt_url`, no enrolment) has none of this.
"""

from __future__ import annotations

import logging
import ssl
import threading

from agent.config import AgentConfig
from agent.errors import ConfigError, TransportError
from agent.identity import DeviceIdentity, load_identity, locate_broker, needs_renewal, renew
from protocol import DEFAULT_BASE
from protocol.errors import BrokerUrlError
from protocol.mqtt import BrokerAddress, parse_mqtt_urls

__all__ = ["Credentials", "resolve_broker", "tls_context"]

log = logging.getLogger(__name__)


def resolve_broker(config: AgentConfig, identity: DeviceIdentity | None) -> tuple[str, str]:
    """`(mqtt_url, topic_base)`: configured values, else what the coordinator said at enrolment."""
    if identity is not None:
        if identity.device_id != config.device_id:
            raise ConfigError(
                f"device_id {config.device_id!r} differs from the enrolled identity {identity.device_id!r} "
                f"in {identity.directory}"
            )
        return config.mqtt_url or identity.broker_url, config.topic_base or identity.topic_base
    if config.mqtt_url is None:
        raise ConfigError(
            f"device {config.device_id!r} is not enrolled: run `edgefleet-agent enroll --coordinator URL "
            "--device-id ID --token TOKEN` (the token comes from `edgefleet devices enroll ID`)"
        )
    return config.mqtt_url, config.topic_base or DEFAULT_BASE


def tls_context(identity: DeviceIdentity) -> ssl.SSLContext:
    """TLS that trusts only the fleet CA and presents this device's certificate."""
    context = ssl.create_default_context(cafile=str(identity.ca_path))
    context.load_cert_chain(str(identity.cert_path), str(identity.key_path))
    return context


class Credentials:
    """The running agent's identity: `load()` at start, `tls_for(address)`, `start_renewal()`, `stop()`."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.identity: DeviceIdentity | None = None
        self._tls: ssl.SSLContext | None = None
        self._stop = threading.Event()

    @property
    def certificate_serial(self) -> int | None:
        """Serial number of the certificate this device presents (None when it has no fleet identity)."""
        return self.identity.certificate().serial_number if self.identity is not None else None

    @property
    def may_rediscover(self) -> bool:
        """An enrolled agent without a configured `mqtt_url` asks the coordinator where a silent broker went."""
        return self.identity is not None and self.config.mqtt_url is None

    def load(self) -> tuple[tuple[BrokerAddress, ...], str]:
        """Read the identity (renewing a certificate that is due); the brokers' addresses (in the order to try them)
        and the topic base."""
        self.identity = load_identity(self.config.data_dir)
        self.renew_if_due()
        mqtt_url, base = resolve_broker(self.config, self.identity)
        try:
            return parse_mqtt_urls(mqtt_url), base
        except BrokerUrlError as exc:
            raise ConfigError(f"mqtt_url: {exc}") from exc

    def tls_for(self, address: BrokerAddress) -> ssl.SSLContext | None:
        """The TLS context of a connection to `address` (None: plain TCP, or no identity to present)."""
        self._tls = tls_context(self.identity) if self.identity is not None and address.tls else None
        return self._tls

    def renew_if_due(self) -> None:
        """Renew the certificate when its last third has begun; a failure is logged and retried later."""
        identity = self.identity
        if identity is None or not needs_renewal(identity.certificate()):
            return
        try:
            self.identity = renew(identity, timeout_s=min(self.config.download_timeout_s, 30.0))
        except (ConfigError, TransportError) as exc:
            log.warning("certificate renewal of %s failed (retried later): %s", self.config.device_id, exc)
            return
        if self._tls is not None:  # the next (re)connect presents the new certificate
            self._tls.load_cert_chain(str(self.identity.cert_path), str(self.identity.key_path))

    def start_renewal(self) -> None:
        """Check the certificate every `certificate_check_s` while running, renewing it when due."""
        if self.identity is None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(self.config.certificate_check_s):
                self.renew_if_due()

        thread = threading.Thread(target=loop, name=f"{self.config.device_id}-renewal", daemon=True)
        thread.start()

    def stop(self) -> None:
        self._stop.set()

    def locate_broker(self) -> tuple[BrokerAddress, ...] | None:
        """Where the coordinator says the broker is now (the enrolled URL stopped answering); stored for restarts."""
        identity = self.identity
        if identity is None:
            return None
        moved = locate_broker(identity, timeout_s=min(self.config.download_timeout_s, 10.0))
        if moved.topic_base != identity.topic_base:
            log.error("the fleet's topic base changed to %s; restart the agent", moved.topic_base)
            return None
        self.identity = moved
        return parse_mqtt_urls(moved.broker_url)
