"""The embedded broker with a state directory: it keeps its port and remembers sessions, queues and retained messages.

In-process brokers (stopped cleanly); `tests/e2e/test_restarts.py` kills them.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud.broker import EmbeddedBroker
from cloud.broker_address import KeptAddress, plan_listen
from cloud.broker_store import STORE_FILE, BrokerStore
from cloud.errors import BrokerStartError
from tests.cloud.mqtt_helpers import Received, publish

KEPT = KeptAddress("127.0.0.1", 1883, 36249)


@pytest.mark.parametrize(
    ("host", "requested", "kept", "port", "may_move"),
    [
        ("127.0.0.1", 1883, None, 1883, True),  # first start: as asked, a free port if busy
        ("127.0.0.1", 1883, KEPT, 36249, False),  # same request: the port got, never another
        ("127.0.0.1", 0, KeptAddress("127.0.0.1", 0, 40001), 40001, False),
        ("127.0.0.1", 1884, KEPT, 1884, True),  # another port asked for: picked anew
        ("0.0.0.0", 1883, KEPT, 1883, True),  # another host
    ],
)
def test_the_kept_port_is_reused_only_for_the_request_it_was_kept_for(
    host: str, requested: int, kept: KeptAddress | None, port: int, may_move: bool
) -> None:
    plan = plan_listen(host, requested, kept)
    assert (plan.port, plan.fallback, plan.kept) == (port, may_move, None if may_move else kept)


@contextmanager
def occupied(port: int = 0) -> Iterator[int]:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield int(sock.getsockname()[1])


@contextmanager
def running(state: Path, port: int = 0) -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker("127.0.0.1", port, allow_anonymous=True, state_dir=state)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@contextmanager
def session(broker: EmbeddedBroker, client_id: str, *subscribe: str, clean: bool = False) -> Iterator[Received]:
    """A client with a persistent (or clean) session, subscribed at QoS 1; what it receives."""
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
    received, ready = Received(), threading.Event()
    client.on_message = lambda _c, _u, message: received.add(message)
    client.on_subscribe = lambda *_: ready.set()
    client.connect("127.0.0.1", broker.port, keepalive=30)
    client.loop_start()
    try:
        if subscribe:
            client.subscribe([(topic, 1) for topic in subscribe])  # one SUBACK for all
            assert ready.wait(10)
        yield received
    finally:
        client.disconnect()
        client.loop_stop()


def send(broker: EmbeddedBroker, topic: str, payload: bytes, *, retain: bool = False) -> None:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="sender", clean_session=True)
    client.connect("127.0.0.1", broker.port, keepalive=30)
    client.loop_start()
    try:
        publish(client, topic, payload, retain=retain)
    finally:
        client.disconnect()
        client.loop_stop()


def test_broker_listens_on_its_kept_port_after_a_restart_even_once_the_requested_one_is_free(tmp_path: Path) -> None:
    with occupied() as busy:
        with running(tmp_path, busy) as first:
            got = first.port
        assert got != busy
        with running(tmp_path, busy) as again:
            assert again.port == got
    with running(tmp_path, busy) as freed:  # the requested port is free now; devices know only the kept one
        assert freed.port == got


def test_a_taken_kept_port_refuses_the_start_naming_the_port_and_the_file(tmp_path: Path) -> None:
    with running(tmp_path) as first:
        kept = first.port
    with occupied(kept), pytest.raises(BrokerStartError) as refused:
        EmbeddedBroker("127.0.0.1", 0, allow_anonymous=True, state_dir=tmp_path).start()
    message = str(refused.value)
    assert f"127.0.0.1:{kept}" in message and str(tmp_path / "broker.json") in message and "\n" not in message


def test_queued_and_retained_messages_outlive_a_restart_and_are_delivered_once(tmp_path: Path) -> None:
    with running(tmp_path) as broker:
        with session(broker, "sub", "t/#"):
            pass
        send(broker, "t/queued", b"while away")
        send(broker, "t/retained", b"kept", retain=True)
    with running(tmp_path) as broker:
        with session(broker, "sub") as received:
            message = received.wait_for(lambda m: m.topic == "t/queued")
            assert message.payload == b"while away" and message.retain, "from the store: RETAIN flag set"
            received.wait_for(lambda m: m.topic == "t/retained")
            time.sleep(0.5)  # its PUBACK reaches the broker
        with session(broker, "late", "t/retained", clean=True) as late:
            assert late.wait_for(lambda m: True).payload == b"kept"
    with running(tmp_path) as broker, session(broker, "sub") as received:
        time.sleep(1.0)
        assert [m.topic for m in received.messages if m.topic == "t/queued"] == [], "acknowledged: never again"


def test_a_live_message_to_a_connected_session_arrives_without_the_retain_flag(tmp_path: Path) -> None:
    with running(tmp_path) as broker, session(broker, "sub", "t/#") as received:
        send(broker, "t/live", b"now")
        assert not received.wait_for(lambda m: m.topic == "t/live").retain


def test_unsubscribed_filters_and_clean_sessions_are_forgotten(tmp_path: Path) -> None:
    with running(tmp_path) as broker:
        with session(broker, "keeper", "a/#", "b/#"):
            pass
        with session(broker, "leaver", "a/#"):
            pass
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="keeper", clean_session=False)
        unsubscribed = threading.Event()
        client.on_unsubscribe = lambda *_: unsubscribed.set()
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        client.unsubscribe("b/#")
        assert unsubscribed.wait(10)
        client.disconnect()
        client.loop_stop()
        send(broker, "a/1", b"owed")
        with session(broker, "leaver", clean=True):  # a clean session replaces (and forgets) the persistent one
            pass
    store = BrokerStore(tmp_path / STORE_FILE)
    try:
        state = store.load()
    finally:
        store.close()
    assert [(s.client_id, s.subscriptions, [q.topic for q in s.queued]) for s in state.sessions] == [
        ("keeper", (("a/#", 1),), ["a/1"])
    ]
    assert state.inbox == ()
