"""The embedded MQTT broker: amqtt running in a thread of its own, for a coordinator without an external broker.

`edgefleet up` starts one when no `mqtt_url` is configured, so a laptop demo needs no Mosquitto. It listens
with TLS and admits only clients with a fleet certificate, each on its own topics (`cloud.broker_auth`,
`cloud.broker_rights`). Given a `state_dir` (the coordinator's data directory) it keeps its address
(`cloud.broker_address`: the port picked on first start is reused) and its memory (`cloud.broker_durable`:
persistent sessions, their subscriptions and queued QoS 1 messages, retained messages) across a restart or a
kill. Last wills die with the process: the coordinator does not trust an `online` it has not heard since it
started (see `cloud.services.devices.mark_unconfirmed`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from cloud.broker_address import (
    ADDRESS_FILE,
    KeptAddress,
    ListenPlan,
    kept_port_taken,
    load_kept_address,
    plan_listen,
    port_is_busy,
    save_kept_address,
)
from cloud.broker_auth import bind_identity, session_identity
from cloud.broker_durable import DurableBroker
from cloud.broker_rights import Identity
from cloud.broker_store import STORE_FILE, BrokerStore
from cloud.errors import BrokerStartError
from protocol.topics import DEFAULT_BASE

__all__ = ["BrokerTls", "EmbeddedBroker", "tls_files"]

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class BrokerTls:
    """The files of a TLS listener that requires fleet client certificates."""

    ca: Path
    cert: Path
    key: Path
    crl: Path


def _broker_config(host: str, port: int, tls: BrokerTls | None, topic_base: str) -> dict[str, Any]:
    """amqtt configuration: one listener; with `tls`, fleet certificates and topic rights, else anyone."""
    listener: dict[str, Any] = {"type": "tcp", "bind": f"{host}:{port}", "max_connections": -1}
    if tls is None:
        return {"listeners": {"default": listener}, "plugins": {"cloud.broker_auth.OpenSessionAuthPlugin": {}}}
    listener.update(ssl=True, cafile=str(tls.ca), certfile=str(tls.cert), keyfile=str(tls.key))
    return {
        "listeners": {"default": listener},
        "plugins": {
            "cloud.broker_auth.FleetAuthPlugin": {"crl_path": str(tls.crl), "topic_base": topic_base},
            "cloud.broker_auth.FleetTopicPlugin": {"topic_base": topic_base},
        },
    }


def _is_address_in_use(exc: BaseException) -> bool:
    """True if `exc` (or an exception it was raised from) is EADDRINUSE."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.EADDRINUSE:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _FleetBroker(DurableBroker):
    """amqtt's broker (with a memory, `cloud.broker_durable`) and two fixes that make client identities hold.

    1. A client is authenticated *before* its CONNECT touches any session. amqtt 0.12 first deletes (clean
       session) or reuses (persistent session, keeping the earlier connection's TLS object) the session of
       the client id it names, and authenticates afterwards: anyone could take over a device's session.
    2. Retained messages go only to clients subscribed to a matching filter. amqtt 0.12 replays, to every
       connecting client, the retained messages matching *any* client's subscriptions.
    """

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        try:
            handler, incoming = await self._read_connect(reader, writer)
        except (AMQTTError, NoDataError) as exc:
            raise AMQTTError(exc) from exc
        except MQTTError:
            await writer.close()
            raise
        if not await self._authenticate(incoming, None):  # the listener argument is unused
            handler.attach(incoming, reader, writer)
            incoming.parent = 0
            await handler.mqtt_connack_authorize(False)
            await writer.close()
            raise AMQTTError(f"client {incoming.client_id!r} from {remote_address}:{remote_port} not authorized")
        ssl_object = incoming.ssl_object
        reused = not incoming.clean_session and incoming.client_id in self._sessions
        handler, session = await self._continue_session(handler, incoming)
        if reused:
            session.ssl_object = ssl_object  # authenticate the reused session with *this* connection's certificate
        self._keep_session(session, incoming)
        return handler, session

    def _owner(self, session: Session) -> str | None:
        identity = session_identity(session)
        if identity is None:
            return None
        return f"{'coordinator' if identity.coordinator else 'device'}:{identity.name}"

    def _bind_owner(self, session: Session, owner: str | None) -> None:
        if owner:
            kind, _, name = owner.partition(":")
            bind_identity(session, Identity(name, coordinator=kind == "coordinator"))

    async def _continue_session(
        self, handler: BrokerProtocolHandler, incoming: Session
    ) -> tuple[BrokerProtocolHandler, Session]:
        """amqtt's own session lookup (clean: replace; persistent: reuse), after authentication."""
        if incoming.clean_session:
            if incoming.client_id:
                await self._delete_session(incoming.client_id)
            incoming.parent = 0
            session = incoming
        elif incoming.client_id in self._sessions:
            session, _ = self._sessions[incoming.client_id]
            for attr in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive"):
                setattr(session, attr, getattr(incoming, attr))
            session.username, session.password = incoming.username, incoming.password
            session.parent = 1
        else:
            incoming.parent = 0
            session = incoming
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Any) -> None:
        topic_filter, _ = subscription
        holders = self._subscriptions.get(topic_filter, [])
        granted = [qos for held, qos in holders if held.client_id == session.client_id]
        if granted:
            await super()._publish_retained_messages_for_subscription((topic_filter, granted[0]), session)


class EmbeddedBroker:
    """An amqtt broker in its own thread and event loop; `start()` returns once it accepts connections.

    `port=0` picks a free port. With `fallback_to_free_port`, a busy port is replaced by a free one and the
    change is logged (the coordinator then advertises the actual URL through `/api/v1/info`). `tls` makes it
    a fleet broker (client certificates, topic rights under `topic_base`); without it the broker admits
    anyone, which only `allow_anonymous=True` permits (a bare broker for agent tests).

    With `state_dir`, the broker keeps its address in `state_dir/broker.json` (a later start asking for the
    same host and port listens where the first one did, or refuses to start: `cloud.broker_address`) and its
    sessions, queued and retained messages in `state_dir/broker.sqlite3` (`cloud.broker_durable`).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        tls: BrokerTls | None = None,
        topic_base: str = DEFAULT_BASE,
        allow_anonymous: bool = False,
        fallback_to_free_port: bool = True,
        state_dir: Path | None = None,
    ) -> None:
        if tls is None and not allow_anonymous:
            raise BrokerStartError("the embedded broker needs TLS files (fleet certificates) or allow_anonymous=True")
        self.host = host
        self.tls = tls
        self.topic_base = topic_base
        self._requested_port = port
        self._fallback = fallback_to_free_port
        self._state_dir = state_dir
        self._store: BrokerStore | None = None
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: _FleetBroker | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        """The port the broker listens on (only known once started)."""
        if self._port is None:
            raise RuntimeError("EmbeddedBroker is not started")
        return self._port

    @property
    def url(self) -> str:
        """`mqtts://host:port` (or `mqtt://` without TLS) of the running broker."""
        scheme = "mqtt" if self.tls is None else "mqtts"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def running(self) -> bool:
        """True between a successful `start()` and `stop()`."""
        return self._thread is not None and self._thread.is_alive() and self._port is not None

    def start(self) -> None:
        """Start the broker and block until it listens; `BrokerStartError` if it cannot."""
        if self._thread is not None:
            raise RuntimeError("EmbeddedBroker.start() called twice")
        self._thread = threading.Thread(target=self._run, name="edgefleet-embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT_S):
            raise BrokerStartError(f"embedded MQTT broker did not start within {_START_TIMEOUT_S:.0f}s")
        if self._error is not None:
            self._thread.join(_STOP_TIMEOUT_S)
            self._thread = None
            if isinstance(self._error, BrokerStartError):
                raise self._error
            raise BrokerStartError(
                f"embedded MQTT broker could not start on {self.host}:{self._requested_port}: {self._error}"
            ) from self._error
        log.info("embedded MQTT broker listening url=%s", self.url)

    def stop(self) -> None:
        """Shut the broker down and wait for its thread; safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            try:
                future.result(_STOP_TIMEOUT_S)
            except Exception as exc:  # shutdown is best effort: the loop is stopped below regardless
                log.warning("embedded MQTT broker shutdown was not clean: %s", exc)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(_STOP_TIMEOUT_S)
        self._thread = None
        self._port = None
        log.info("embedded MQTT broker stopped")

    # -- the broker thread ------------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._start_in_loop())
        except BaseException as exc:  # reported to the thread blocked in start()
            self._error = exc
            if self._store is not None:
                self._store.close()
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _start_in_loop(self) -> None:
        plan = ListenPlan(self._requested_port, self._fallback)
        if self._state_dir is not None:
            plan = plan_listen(
                self.host, self._requested_port, load_kept_address(self._address_file), fallback=self._fallback
            )
            self._state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._store = BrokerStore(self._state_dir / STORE_FILE)  # opened here: only this thread uses it
        port = plan.port
        # Probe first so that a busy port is a one-line warning rather than amqtt's logged traceback;
        # the except below still covers the race where the port is taken between probe and bind.
        if port != 0 and (plan.fallback or plan.kept is not None) and port_is_busy(self.host, port):
            self._refuse_kept(plan)
            self._warn_busy()
            port = 0
        try:
            self._broker = await self._start_listening(port)
        except Exception as exc:
            if not (port != 0 and _is_address_in_use(exc)):
                raise
            self._refuse_kept(plan)
            if not plan.fallback:
                raise
            self._warn_busy()
            self._broker = await self._start_listening(0)
        if self._state_dir is not None:
            save_kept_address(self._address_file, KeptAddress(self.host, self._requested_port, self.port))

    @property
    def _address_file(self) -> Path:
        assert self._state_dir is not None
        return self._state_dir / ADDRESS_FILE

    def _refuse_kept(self, plan: ListenPlan) -> None:
        """A kept port that is taken is an error, never a reason to move (devices know only that port)."""
        if plan.kept is not None:
            raise BrokerStartError(kept_port_taken(self._address_file, plan.kept))

    def _warn_busy(self) -> None:
        log.warning(
            "MQTT port %s:%s is busy; the embedded broker listens on a free port instead (its URL is logged next)",
            self.host,
            self._requested_port,
        )

    async def _start_listening(self, port: int) -> _FleetBroker:
        broker = _FleetBroker(
            _broker_config(self.host, port, self.tls, self.topic_base),
            loop=asyncio.get_running_loop(),
            store=self._store,
        )
        await broker.start()
        server = broker._servers["default"].instance  # amqtt exposes no public way to learn a bound port
        self._port = int(server.sockets[0].getsockname()[1])
        return broker

    async def _shutdown(self) -> None:
        try:
            if self._broker is not None:
                await self._broker.shutdown()
        finally:
            if self._store is not None:
                self._store.close()


def main(argv: list[str] | None = None) -> None:
    """`python -m cloud.broker --pki-dir DIR`: the embedded broker alone, until SIGTERM or Ctrl-C.

    For tests and benchmarks that want amqtt as an *external* broker in a process of its own: with the
    fleet's PKI directory (`edgefleet broker pki`) it is the same fleet broker `edgefleet up` runs;
    `--allow-anonymous` instead runs a bare broker that admits anyone (agent tests only). `--state-dir` keeps
    its port, sessions, queued and retained messages there across restarts (as `edgefleet up` does).
    """
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="python -m cloud.broker", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8883, help="port; 0 picks a free one (default 8883)")
    parser.add_argument("--pki-dir", type=Path, help="the fleet PKI directory (ca.crt, broker.crt/key, crl.pem)")
    parser.add_argument("--topic-base", default=DEFAULT_BASE, help=f"topic base of the rights (default {DEFAULT_BASE})")
    parser.add_argument("--allow-anonymous", action="store_true", help="no TLS, no authentication (tests only)")
    parser.add_argument("--state-dir", type=Path, help="keep the port, sessions and messages here across restarts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.pki_dir is None and not args.allow_anonymous:
        parser.error("give --pki-dir (a fleet broker) or --allow-anonymous (a bare broker for tests)")
    tls = None if args.pki_dir is None else tls_files(args.pki_dir)
    broker = EmbeddedBroker(
        args.host,
        args.port,
        tls=tls,
        topic_base=args.topic_base,
        allow_anonymous=args.allow_anonymous,
        state_dir=args.state_dir,
    )
    try:
        broker.start()
    except BrokerStartError as exc:
        parser.exit(1, f"error: {exc}\n")
    print(broker.url, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()


def tls_files(pki_dir: Path) -> BrokerTls:
    """The broker's TLS files in a fleet PKI directory (see `cloud.pki`)."""
    return BrokerTls(
        ca=pki_dir / "ca.crt", cert=pki_dir / "broker.crt", key=pki_dir / "broker.key", crl=pki_dir / "crl.pem"
    )


if __name__ == "__main__":
    main()
