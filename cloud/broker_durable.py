"""amqtt with a memory: persistent sessions, messages owed and retained messages outlive a restart or a SIGKILL.

amqtt 0.12 keeps all of this in memory only, and its own `SessionDBPlugin` stores sessions but never forgets a
delivered message (every restart would replay them all), loses binary payloads, ignores unsubscriptions and
writes nothing before the publisher's PUBACK. `DurableBroker` instead hooks the broker's own steps and
writes each promise to a `cloud.broker_store.BrokerStore` at the moment it is made:

1. A QoS 1 PUBLISH is written to the store's inbox *before* its PUBACK goes out (`_StoringHandler`).
2. Routing it to subscribers queues one row per persistent session and retires the inbox row, in one
   transaction; a queued row goes when that client's PUBACK arrives. A delivery that fails (no PUBACK
   within amqtt's 5 s, connection lost) goes back to the session's queue for its next connection, where amqtt
   would drop it.
3. Subscriptions and sessions of `clean_session=False` clients, and retained messages, are written as they change.

On start the store is loaded before the listener opens: sessions come back disconnected with their
subscriptions, queues and owner (the identity they authenticated as, so that topic rights still apply while
their TLS connection is gone), retained messages come back, and inbox messages are routed again. Messages
that come back from the store are delivered with the RETAIN flag set: they were not received on a
connection of this broker run, and a subscriber that cares (the coordinator's bridge, deciding whether a
device is online) can tell them from live traffic.

What is *not* kept: QoS 0 messages, QoS 2 flows in progress, last wills (a will belongs to a live connection)
and clean sessions. Every message is delivered at least once; after a kill a few may come twice.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from typing import Any

from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.contexts import Action, BrokerConfig
from amqtt.mqtt.constants import QOS_0, QOS_1
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import IncomingApplicationMessage, OutgoingApplicationMessage, Session

from cloud.broker_store import BrokerStore, StoredState

__all__ = ["DurableBroker"]

log = logging.getLogger(__name__)

_REFUSED = 0x80  # amqtt's SUBACK return code of a refused subscription
_DRAIN_WINDOW = 16  # queued messages in flight at once to a reconnected client (each must be acked within 5 s)
_INBOX_KEY = "edgefleet_inbox_id"
_REPLAYED_KEY = "edgefleet_replayed"
# The inbox id of the message being routed by this client's task, until `_broadcast_message` takes it.
_ROUTING: contextvars.ContextVar[list[int | None] | None] = contextvars.ContextVar("edgefleet_routing", default=None)


class _Incoming(IncomingApplicationMessage):
    """An incoming PUBLISH with the inbox row that keeps it until it is routed."""

    def __init__(self, packet: PublishPacket, topic: str, data: bytes, inbox_id: int | None) -> None:
        packet_id = packet.variable_header.packet_id if packet.variable_header else None
        super().__init__(packet_id, topic, packet.qos, data, packet.retain_flag)
        self.publish_packet = packet
        self.inbox_id = inbox_id


class _Owed(RetainedApplicationMessage):
    """A message owed to a session: its queued row (None when not kept) and whether it came from the store."""

    __slots__ = ("queued_id", "replayed")

    def __init__(self, topic: str, data: bytes | bytearray, qos: int, queued_id: int | None, replayed: bool) -> None:
        super().__init__(None, topic, data, qos)
        self.queued_id = queued_id
        self.replayed = replayed


class _StoringHandler(BrokerProtocolHandler):
    """A connection's protocol handler that has each QoS 1 PUBLISH written down before acknowledging it."""

    broker: DurableBroker | None = None

    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        topic, data = publish_packet.topic_name, publish_packet.data
        if topic is None or data is None:
            return
        inbox_id = None
        if self.broker is not None and self.session is not None and publish_packet.qos == QOS_1:
            inbox_id = self.broker._accept(self.session, topic, bytes(data), publish_packet.retain_flag)
        await self._handle_message_flow(_Incoming(publish_packet, topic, bytes(data), inbox_id))


class DurableBroker(Broker):
    """amqtt's broker keeping its sessions, queues and retained messages in `store` (None: in memory only).

    Subclasses name the identity a session authenticated as (`_owner`) and give it back to a restored
    session (`_bind_owner`); they must read CONNECT with `_read_connect` and call `_keep_session` once a
    client is admitted.
    """

    def __init__(
        self,
        config: BrokerConfig | dict[str, Any] | None,
        *,
        loop: asyncio.AbstractEventLoop,
        store: BrokerStore | None,
    ) -> None:
        super().__init__(config, loop=loop)
        self._store = store
        self._drains: set[asyncio.Task[None]] = set()

    # -- identity hooks for subclasses ------------------------------------------------------------

    def _owner(self, session: Session) -> str | None:
        """The identity `session` authenticated as, as text (None: nobody in particular)."""
        return None

    def _bind_owner(self, session: Session, owner: str | None) -> None:
        """Give a restored session the identity it authenticated as when it was stored."""

    # -- admitting clients ------------------------------------------------------------------------

    async def _read_connect(self, reader: Any, writer: Any) -> tuple[BrokerProtocolHandler, Session]:
        """Read a CONNECT into a handler that writes QoS 1 messages down before acknowledging them."""
        handler, incoming = await _StoringHandler.init_from_connect(reader, writer, self.plugins_manager)
        assert isinstance(handler, _StoringHandler)
        handler.broker = self
        return handler, incoming

    def _keep_session(self, session: Session, authenticated: Session) -> None:
        """Record an admitted persistent session, owned by the identity `authenticated` proved."""
        if self._store is not None and _persistent(session) and session.client_id:
            self._store.keep_session(session.client_id, self._owner(authenticated))

    async def _delete_session(self, client_id: str) -> None:
        if self._store is not None:
            self._store.forget_session(client_id)
        await super()._delete_session(client_id)

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        qos = await super().add_subscription(subscription, session)
        if self._store is not None and qos != _REFUSED and _persistent(session) and session.client_id:
            self._store.subscribe(session.client_id, subscription[0], qos)
        return qos

    async def _handle_unsubscription(
        self, client_session: Session, handler: BrokerProtocolHandler, unsubscribe_waiter: asyncio.Future[Any]
    ) -> None:
        if self._store is not None and _persistent(client_session) and client_session.client_id:
            self._store.unsubscribe(client_session.client_id, unsubscribe_waiter.result().topics)
        await super()._handle_unsubscription(client_session, handler, unsubscribe_waiter)

    # -- accepting and routing messages -----------------------------------------------------------

    def _accept(self, session: Session, topic: str, data: bytes, retain: bool) -> int | None:
        """Write an incoming QoS 1 message to the inbox (before its PUBACK); None when it will not be routed."""
        if self._store is None or not topic or "#" in topic or "+" in topic or topic.startswith("$"):
            return None  # amqtt refuses these topics and closes the connection
        return self._store.accept(topic, data, QOS_1, retain, self._owner(session))

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        pending: list[int | None] = [getattr(wait_deliver.result(), "inbox_id", None)]
        token = _ROUTING.set(pending)
        try:
            keep_going = await super()._handle_message_delivery(client_session, handler, wait_deliver)
        finally:
            _ROUTING.reset(token)
        if pending[0] is not None and self._store is not None:
            self._store.drop_inbox(pending[0])  # not routed: refused by the topic rights, or an invalid topic
        return keep_going

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        broadcast: dict[str, Any] = {"session": session, "topic": topic, "data": data}
        if force_qos is not None:
            broadcast["qos"] = force_qos
        pending = _ROUTING.get()
        if pending is not None and pending[0] is not None:
            broadcast[_INBOX_KEY], pending[0] = pending[0], None
        await self._broadcast_queue.put(broadcast)

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[OutgoingApplicationMessage]]) -> None:
        """amqtt's routing of one message, with persistent sessions' copies written down before they are sent."""
        broadcast = await self._broadcast_queue.get()
        topic, data = broadcast["topic"], broadcast["data"]
        targets: list[tuple[Session, int]] = []
        for topic_filter, subscriptions in list(self._subscriptions.items()):
            if not self._matches(topic, topic_filter):
                continue
            for session, granted in list(subscriptions):
                if await self._topic_filtering(session, topic=topic, action=Action.RECEIVE):
                    targets.append((session, broadcast.get("qos", granted)))
        # Persistent sessions are owed QoS 1 copies, connected or not (one per matching subscription, as amqtt).
        owed = [i for i, (s, qos) in enumerate(targets) if _persistent(s) and qos > QOS_0 and s.client_id]
        queued_ids: list[int | None] = [None] * len(targets)
        if self._store is not None:
            deliveries = [(str(targets[i][0].client_id), topic, bytes(data), targets[i][1]) for i in owed]
            for i, queued_id in zip(owed, self._store.route(broadcast.get(_INBOX_KEY), deliveries), strict=True):
                queued_ids[i] = queued_id
        replayed = bool(broadcast.get(_REPLAYED_KEY))
        for i, (session, qos) in enumerate(targets):
            message = _Owed(topic, data, qos, queued_ids[i], replayed)
            if session.transitions.state != "connected":
                if i in owed:
                    session.retained_messages.put_nowait(message)
                continue
            handler = self._get_handler(session)
            if handler is not None:
                running_tasks.append(asyncio.ensure_future(self._deliver(handler, session, message)))

    async def _deliver(self, handler: BrokerProtocolHandler, session: Session, message: _Owed) -> None:
        """Send `message` to a connected session; retire its queued row on PUBACK, queue it again on failure."""
        if self._get_handler(session) is not handler or session.transitions.state != "connected":
            self._owe_again(session, handler, message)
            return
        try:
            await handler.mqtt_publish(message.topic, message.data, message.qos, retain=message.replayed)
        except asyncio.CancelledError:
            self._owe_again(session, handler, message)
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return
        except Exception as exc:  # no PUBACK in time, or the connection went: amqtt would drop the message
            log.debug("delivery to %s failed (%s); kept for its next connection", session.client_id, exc)
            self._owe_again(session, handler, message)
            return
        if message.queued_id is not None and self._store is not None:
            self._store.delivered(message.queued_id)

    def _owe_again(self, session: Session, failed: BrokerProtocolHandler, message: _Owed) -> None:
        """Put an undelivered message back in its session's queue (persistent sessions, QoS 1 only)."""
        if message.qos == QOS_0 or not _persistent(session) or not session.client_id:
            return
        current, handler = self._sessions.get(session.client_id, (None, None))
        if current is not session:
            return  # the session was replaced by a clean one: what it was owed went with it
        session.retained_messages.put_nowait(message)
        if handler is not None and handler is not failed and session.transitions.state == "connected":
            # The client is back on a new connection whose queue was already sent: send this one too.
            drain = asyncio.ensure_future(self._publish_session_retained_messages(session))
            self._drains.add(drain)
            drain.add_done_callback(self._drains.discard)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Send a (re)connected session what it is owed, a window at a time so that each is acked within 5 s."""
        handler = self._get_handler(session)
        if handler is None:
            return
        window = asyncio.Semaphore(_DRAIN_WINDOW)

        async def send(message: _Owed) -> None:
            async with window:
                await self._deliver(handler, session, message)

        tasks = []
        while not session.retained_messages.empty():
            tasks.append(asyncio.ensure_future(send(_owed(session.retained_messages.get_nowait()))))
        if tasks:
            await asyncio.wait(tasks)

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        if self._store is not None and topic_name is not None:
            if data:
                self._store.retain(topic_name, bytes(data), qos or 0)
            elif topic_name in self._retained_messages:
                self._store.unretain(topic_name)
        await super().retain_message(source_session, topic_name, data, qos)

    # -- restoring --------------------------------------------------------------------------------

    async def _start_listeners(self) -> None:
        if self._store is not None:
            await self._restore(self._store.load())
        await super()._start_listeners()

    async def _restore(self, state: StoredState) -> None:
        """Bring back sessions, subscriptions, queues and retained messages; route the inbox again."""
        for stored in state.sessions:
            handler, session = self.create_offline_session(stored.client_id)
            session.clean_session = False
            self._bind_owner(session, stored.owner)
            self._sessions[stored.client_id] = (session, handler)
            for topic_filter, qos in stored.subscriptions:
                self._subscriptions.setdefault(topic_filter, []).append((session, qos))
            for queued in stored.queued:
                session.retained_messages.put_nowait(_Owed(queued.topic, queued.payload, queued.qos, queued.id, True))
        for topic, payload, qos in state.retained:
            self._retained_messages[topic] = RetainedApplicationMessage(None, topic, payload, qos)
        replayed = 0
        for message in state.inbox:
            publisher = Session()
            publisher.client_id = "edgefleet-inbox-replay"
            self._bind_owner(publisher, message.owner)
            if not await self._topic_filtering(publisher, topic=message.topic, action=Action.PUBLISH):
                assert self._store is not None
                self._store.drop_inbox(message.id)
                continue
            if message.retain:
                await self.retain_message(None, message.topic, message.payload, message.qos)
            broadcast = {"session": None, "topic": message.topic, "data": message.payload}
            self._broadcast_queue.put_nowait({**broadcast, _INBOX_KEY: message.id, _REPLAYED_KEY: True})
            replayed += 1
        log.info(
            "embedded broker restored sessions=%d queued=%d retained=%d unrouted=%d",
            len(state.sessions),
            sum(len(s.queued) for s in state.sessions),
            len(state.retained),
            replayed,
        )


def _persistent(session: Session) -> bool:
    """A session the broker keeps across disconnects (and, with a store, across restarts)."""
    return session.clean_session is False and not session.is_anonymous


def _owed(message: Any) -> _Owed:
    """A message from a session's queue as an `_Owed` (amqtt or a plugin may have queued a plain one)."""
    if isinstance(message, _Owed):
        return message
    return _Owed(message.topic, message.data, message.qos or QOS_1, None, False)
