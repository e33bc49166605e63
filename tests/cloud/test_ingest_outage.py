"""The bridge never acknowledges a message it failed to store: a database outage holds ingest, nothing is lost.

The end-to-end tests stop a PostgreSQL server of their own mid-stream (fast shutdown) under a coordinator
bridged to a real Mosquitto, and check that every telemetry window is stored exactly once afterwards.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import (
    DataError,
    DisconnectionError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    ProgrammingError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlmodel import Session, col, select

from cloud.models import TelemetryRecord
from cloud.outage import DatabaseUnavailableError, PatientDatabase, backoff_delays, is_transient
from protocol.codec import encode
from protocol.topics import Topics
from tests.cloud.conftest import Api
from tests.cloud.fleet_helpers import enrol, live_coordinator, wait_until, window
from tests.cloud.mqtt_helpers import connected_client, publish
from tests.services import OwnPostgres, run_own_postgres

# -- which errors are transient (pure) ---------------------------------------------------------------


def _dbapi(kind: type[Exception], *, invalidated: bool = False) -> Exception:
    return kind("INSERT ...", {}, Exception("driver says no"), connection_invalidated=invalidated)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (_dbapi(OperationalError), True),  # server down, refused, shutting down, "database is locked"
        (_dbapi(InterfaceError), True),
        (DisconnectionError("gone"), True),
        (PoolTimeoutError("pool exhausted"), True),
        (_dbapi(ProgrammingError, invalidated=True), True),  # whatever it is, the connection died under it
        (_dbapi(IntegrityError), False),  # the data is at fault: a retry fails the same way
        (_dbapi(DataError), False),
        (_dbapi(ProgrammingError), False),
        (ValueError("a bug"), False),
        (OverflowError("Python int too large to convert to SQLite INTEGER"), False),
    ],
)
def test_only_errors_of_a_database_that_did_not_answer_are_retried(error: Exception, transient: bool) -> None:
    assert is_transient(error) is transient


def test_backoff_doubles_from_a_fifth_of_a_second_up_to_five_seconds() -> None:
    assert list(itertools.islice(backoff_delays(), 8)) == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]


def test_outage_is_retried_until_the_database_answers_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    changes: list[bool] = []
    database = PatientDatabase(engine, on_outage=changes.append, first_delay_s=0.01, max_delay_s=0.02)
    seen_down: list[bool] = []

    def work(_session: Session) -> str:
        seen_down.append(database.down)
        if len(seen_down) <= 5:
            raise _dbapi(OperationalError)
        return "stored"

    caplog.set_level(logging.INFO, logger="cloud.outage")
    assert database.run(work) == "stored"
    assert seen_down == [False, True, True, True, True, True]
    assert changes == [True, False] and not database.down
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # one line when the outage starts, one when it ends: not one per retry
    assert "database unavailable" in messages[0] and "after" in messages[1] and "(5 retries)" in messages[1]


def test_error_a_retry_cannot_fix_propagates_at_once(tmp_path: Path) -> None:
    database = PatientDatabase(create_engine(f"sqlite:///{tmp_path / 'x.db'}"))
    calls = []

    def work(_session: Session) -> None:
        calls.append(1)
        raise _dbapi(IntegrityError)

    with pytest.raises(IntegrityError):
        database.run(work)
    assert calls == [1] and not database.down


def test_stopping_ends_the_wait_without_doing_the_work(tmp_path: Path) -> None:
    database = PatientDatabase(create_engine(f"sqlite:///{tmp_path / 'x.db'}"), first_delay_s=0.05, max_delay_s=0.05)

    def never(_session: Session) -> None:
        raise _dbapi(OperationalError)

    threading.Timer(0.3, database.stop).start()
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailableError, match="stopped while the database did not answer"):
        database.run(never)
    assert time.monotonic() - started < 5


# -- end to end: a real PostgreSQL stopped under a real bridge ----------------------------------------


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    """A PostgreSQL server of this test's own, to stop and start."""
    with run_own_postgres() as server:
        yield server


def stored_seqs(api: Api, device_id: str) -> list[int]:
    with Session(api.coordinator.engine) as session:
        statement = select(TelemetryRecord.seq).where(TelemetryRecord.device_id == device_id)
        return list(session.exec(statement.order_by(col(TelemetryRecord.seq))))


def stats(api: Api) -> dict[str, Any]:
    return dict(api.client.get("/api/v1/stats", headers=api.auth).json())


def test_postgres_stopped_mid_stream_loses_and_duplicates_no_telemetry_window(
    own_postgres: OwnPostgres, mosquitto_url: str, topic_base: str, tmp_path: Path
) -> None:
    total, topic = 300, Topics(topic_base).telemetry("edge-1")
    with live_coordinator(
        tmp_path, mqtt_url=mosquitto_url, topic_base=topic_base, database_url=own_postgres.url
    ) as api:
        enrol(api.coordinator, "edge-1")
        with connected_client(mosquitto_url) as (client, _):

            def stream() -> None:
                for seq in range(total):
                    publish(client, topic, encode(window("edge-1", seq)))
                    time.sleep(0.02)

            streamer = threading.Thread(target=stream)
            streamer.start()
            wait_until(lambda: len(stored_seqs(api, "edge-1")) >= 50, what="50 windows stored")
            own_postgres.stop("fast")
            wait_until(lambda: stats(api)["database_down"], what="the bridge to see the outage")
            assert api.client.get("/healthz").status_code == 503
            time.sleep(3)
            own_postgres.start()
            streamer.join(60)
        wait_until(lambda: len(stored_seqs(api, "edge-1")) >= total, timeout=60, what=f"{total} windows stored")
        assert stored_seqs(api, "edge-1") == list(range(total)), "a window was lost or stored twice"
        counters = stats(api)
        assert not counters["database_down"] and counters["failed"] == {}
        assert counters["stored"]["telemetry"] + counters["duplicates_dropped"] == counters["received"]["telemetry"]
        wait_until(lambda: api.client.get("/healthz").status_code == 200, what="ready again")


def test_coordinator_stopped_during_outage_gets_the_unacknowledged_windows_again(
    own_postgres: OwnPostgres, mosquitto_url: str, topic_base: str, tmp_path: Path
) -> None:
    topic = Topics(topic_base).telemetry("edge-2")
    coordinator = {"mqtt_url": mosquitto_url, "topic_base": topic_base, "database_url": own_postgres.url}
    with live_coordinator(tmp_path, **coordinator) as api, connected_client(mosquitto_url) as (client, _):
        enrol(api.coordinator, "edge-2")
        for seq in range(20):
            publish(client, topic, encode(window("edge-2", seq)))
        wait_until(lambda: len(stored_seqs(api, "edge-2")) == 20, what="20 windows stored")
        own_postgres.stop("fast")
        for seq in range(20, 40):
            publish(client, topic, encode(window("edge-2", seq)))
        wait_until(lambda: stats(api)["database_down"], what="the bridge to see the outage")
    # The coordinator stopped while holding windows it could not store: none of them was acknowledged.
    own_postgres.start()
    with live_coordinator(tmp_path, **coordinator) as api:
        wait_until(lambda: len(stored_seqs(api, "edge-2")) == 40, timeout=30, what="the held windows redelivered")
        assert stored_seqs(api, "edge-2") == list(range(40))


def test_window_the_database_refuses_is_counted_failed_acknowledged_and_not_retried(
    mosquitto_url: str, topic_base: str, tmp_path: Path
) -> None:
    topic = Topics(topic_base).telemetry("edge-3")
    with live_coordinator(tmp_path, mqtt_url=mosquitto_url, topic_base=topic_base) as api:
        enrol(api.coordinator, "edge-3")
        with connected_client(mosquitto_url) as (client, _):
            publish(client, topic, encode(window("edge-3", 2**64)))  # valid on the wire, beyond any 64-bit column
            publish(client, topic, encode(window("edge-3", 1)))
        wait_until(lambda: stored_seqs(api, "edge-3") == [1], what="the next window stored")
        counters = stats(api)
        assert counters["failed"] == {"telemetry": 1} and not counters["database_down"]
        assert api.client.get("/healthz").status_code == 200
