"""The embedded MQTT broker: amqtt running in a thread of its own, for a coordinator without an external broker.

`edgefleet up` starts one when no `mqtt_url` is configured, so a laptop demo needs no Mosquitto. It keeps
retained messages and delivers last wills, but only in memory: after a restart the coordinator refills the
retained desired states itself (see `cloud.bridge`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from cloud.errors import BrokerStartError

__all__ = ["EmbeddedBroker"]

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 10.0


def _broker_config(host: str, port: int) -> dict[str, Any]:
    """amqtt configuration: one TCP listener, anonymous clients, no $SYS chatter or packet logging."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": -1}},
        "plugins": {f"{__name__}.OpenSessionAuthPlugin": {}},
    }


def _is_address_in_use(exc: BaseException) -> bool:
    """True if `exc` (or an exception it was raised from) is EADDRINUSE."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.EADDRINUSE:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class OpenSessionAuthPlugin(BaseAuthPlugin):
    """Accepts every client without marking it anonymous.

    amqtt's AnonymousAuthPlugin flags sessions as anonymous, and amqtt then never queues QoS 1 messages
    for a disconnected persistent session: telemetry sent while the coordinator restarts would be lost.
    Device authentication on the broker comes with governance; until then the embedded broker listens on
    the address the operator chose (loopback by default).
    """

    @dataclass
    class Config:
        """No options."""

    async def authenticate(self, *, session: Session) -> bool | None:
        """Every client may connect; its session keeps offline QoS 1 messages if it asked for that."""
        return True


class _FleetBroker(Broker):
    """amqtt's broker with one fix: retained messages go only to clients subscribed to a matching filter.

    amqtt 0.12 replays, to every connecting client, the retained messages matching *any* client's
    subscriptions, so a device would receive other devices' desired states. Here a replay for a filter
    happens only when this session holds that filter, at the QoS it was granted.
    """

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Any) -> None:
        topic_filter, _ = subscription
        holders = self._subscriptions.get(topic_filter, [])
        granted = [qos for held, qos in holders if held.client_id == session.client_id]
        if granted:
            await super()._publish_retained_messages_for_subscription((topic_filter, granted[0]), session)


def _port_is_busy(host: str, port: int) -> bool:
    """True if something already listens on host:port (binding it fails with EADDRINUSE)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


class EmbeddedBroker:
    """An amqtt broker in its own thread and event loop; `start()` returns once it accepts connections.

    `port=0` picks a free port. With `fallback_to_free_port`, a busy port is replaced by a free one and the
    change is logged (the coordinator then advertises the actual URL through `/api/v1/info`).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 1883, *, fallback_to_free_port: bool = True) -> None:
        self.host = host
        self._requested_port = port
        self._fallback = fallback_to_free_port
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
        """`mqtt://host:port` of the running broker."""
        return f"mqtt://{self.host}:{self.port}"

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
        port = self._requested_port
        # Probe first so that a busy port is a one-line warning rather than amqtt's logged traceback;
        # the except below still covers the race where the port is taken between probe and bind.
        if self._fallback and port != 0 and _port_is_busy(self.host, port):
            self._warn_busy()
            port = 0
        try:
            self._broker = await self._start_listening(port)
        except Exception as exc:
            if not (self._fallback and port != 0 and _is_address_in_use(exc)):
                raise
            self._warn_busy()
            self._broker = await self._start_listening(0)

    def _warn_busy(self) -> None:
        log.warning(
            "MQTT port %s:%s is busy; the embedded broker listens on a free port instead (its URL is logged next)",
            self.host,
            self._requested_port,
        )

    async def _start_listening(self, port: int) -> _FleetBroker:
        broker = _FleetBroker(_broker_config(self.host, port), loop=asyncio.get_running_loop())
        await broker.start()
        server = broker._servers["default"].instance  # amqtt exposes no public way to learn a bound port
        self._port = int(server.sockets[0].getsockname()[1])
        return broker

    async def _shutdown(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()


def main(argv: list[str] | None = None) -> None:
    """`python -m cloud.broker [--host H] [--port P]`: the embedded broker alone, until SIGTERM or Ctrl-C.

    For tests and benchmarks that want amqtt as an *external* broker in a process of its own.
    """
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="python -m cloud.broker", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="port; 0 picks a free one (default 1883)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    broker = EmbeddedBroker(args.host, args.port)
    broker.start()
    print(broker.url, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
