"""The embedded broker's gatekeepers (amqtt plugins): client certificates, revocation, client ids and topic rights.

`FleetAuthPlugin` admits a client only with a certificate of the fleet CA (the TLS listener verifies the
chain) that names a device or the coordinator (`cloud.broker_rights.identity_of`), whose serial is not on
the CRL (`pki/crl.pem`, re-read when it changes), and — for a device — whose MQTT client id is its device
id (no client-id takeover) and whose last will, if any, targets a topic it may publish on (a will is
published by the broker later, past the topic check). `FleetTopicPlugin` applies `topic_allowed` to every
publish, subscription and delivery.

`OpenSessionAuthPlugin` admits everyone; only `python -m cloud.broker --allow-anonymous` uses it (tests of
the agent against a bare broker), never the coordinator.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.contexts import Action as AmqttAction
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from cryptography import x509
from cryptography.x509.oid import NameOID

from cloud.broker_rights import Action, Identity, identity_of, topic_allowed
from protocol.topics import DEFAULT_BASE, Topics

__all__ = [
    "FleetAuthPlugin",
    "FleetTopicPlugin",
    "OpenSessionAuthPlugin",
    "RevocationList",
    "bind_identity",
    "session_identity",
]

log = logging.getLogger(__name__)

_IDENTITY_ATTR = "_edgefleet_identity"
_ACTIONS = {AmqttAction.PUBLISH: Action.PUBLISH, AmqttAction.SUBSCRIBE: Action.SUBSCRIBE}


class RevocationList:
    """Serial numbers on the CRL at `path`, re-read whenever the file changes (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._serials: frozenset[int] = frozenset()

    def revoked(self, serial: int) -> bool:
        """True if `serial` is on the current CRL (a missing CRL revokes nothing)."""
        return serial in self._current()

    def _current(self) -> frozenset[int]:
        try:
            stat = self._path.stat()
        except FileNotFoundError:
            return frozenset()
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if stamp != self._stamp:
                crl = x509.load_pem_x509_crl(self._path.read_bytes())
                self._serials = frozenset(entry.serial_number for entry in crl)
                self._stamp = stamp
            return self._serials


def session_identity(session: Session | None) -> Identity | None:
    """The identity `FleetAuthPlugin` attached to an authenticated session."""
    return getattr(session, _IDENTITY_ATTR, None) if session is not None else None


def bind_identity(session: Session, identity: Identity) -> None:
    """Give a session restored from the broker's store the identity it authenticated as when it was stored.

    A restored session has no connection (no certificate) until its client comes back and authenticates
    again; until then the topic rights of deliveries queued for it are those of this identity.
    """
    setattr(session, _IDENTITY_ATTR, identity)


def _peer_certificate(session: Session) -> x509.Certificate | None:
    ssl_object = getattr(session, "ssl_object", None)
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return x509.load_der_x509_certificate(der) if der else None


def _cn_ou(cert: x509.Certificate) -> tuple[str, str]:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return (str(names[0].value) if names else ""), (str(units[0].value) if units else "")


class FleetAuthPlugin(BaseAuthPlugin):
    """Admits fleet certificates only (see the module docstring)."""

    @dataclass
    class Config:
        """Where the CRL is and which topic base the rights apply to."""

        crl_path: str = ""
        topic_base: str = DEFAULT_BASE

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._revocations = RevocationList(Path(self.config.crl_path))
        self._topics = Topics(self.config.topic_base)

    async def authenticate(self, *, session: Session) -> bool | None:
        """True for a valid, unrevoked fleet identity that keeps to its own client id and will topic."""
        refusal = self._refusal(session)
        if refusal is not None:
            log.warning("broker refused client_id=%r: %s", session.client_id, refusal)
            return False
        return True

    def _refusal(self, session: Session) -> str | None:
        cert = _peer_certificate(session)
        if cert is None:
            return "no client certificate (anonymous clients are refused)"
        identity = identity_of(*_cn_ou(cert))
        if identity is None:
            return f"certificate {_cn_ou(cert)} names neither a device nor the coordinator"
        if self._revocations.revoked(cert.serial_number):
            return f"certificate {cert.serial_number:x} of {identity.name!r} is revoked"
        if not identity.coordinator and session.client_id != identity.name:
            return f"device {identity.name!r} must connect with client id {identity.name!r}"
        if session.will_flag and not topic_allowed(identity, self._topics, session.will_topic or "", Action.PUBLISH):
            return f"last will on {session.will_topic!r} is not a topic {identity.name!r} may publish on"
        setattr(session, _IDENTITY_ATTR, identity)
        return None


class FleetTopicPlugin(BaseTopicPlugin):
    """Applies the fleet's topic rights to every publish, subscription and delivery."""

    @dataclass
    class Config:
        """The topic base the rights apply to."""

        topic_base: str = DEFAULT_BASE

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._topics = Topics(self.config.topic_base)

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: AmqttAction | None = None
    ) -> bool | None:
        """False unless the session's identity may do `action` on `topic`."""
        identity = session_identity(session)
        if identity is None or topic is None or action is None:
            return False
        allowed = topic_allowed(identity, self._topics, topic, _ACTIONS.get(action, Action.RECEIVE))
        if not allowed and action is not AmqttAction.RECEIVE:
            log.warning("broker denied %s by %r on %s", action.value, identity.name, topic)
        return allowed


class OpenSessionAuthPlugin(BaseAuthPlugin):
    """Accepts every client without marking it anonymous (so QoS 1 messages queue for persistent sessions)."""

    @dataclass
    class Config:
        """No options."""

    async def authenticate(self, *, session: Session) -> bool | None:
        """Every client may connect."""
        return True
