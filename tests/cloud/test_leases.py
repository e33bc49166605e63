"""Leases in PostgreSQL: one holder at a time, renewed by it, taken over once it stops renewing (`cloud.leases`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from cloud.db import create_db_engine, init_db
from cloud.leases import Leases, leases_for
from cloud.periodic import Periodic


@pytest.fixture
def engine(postgres_url: str) -> Iterator[Engine]:
    engine = create_db_engine(postgres_url)
    init_db(engine)
    try:
        yield engine
    finally:
        engine.dispose()


def test_one_of_several_replicas_racing_for_a_free_lease_gets_it(engine: Engine) -> None:
    replicas = [Leases(engine, f"replica-{i}", ttl_s=30) for i in range(6)]
    start = threading.Barrier(len(replicas))
    granted: list[str] = []

    def race(leases: Leases) -> None:
        start.wait()
        if leases.acquire("rollout:1") is not None:
            granted.append(leases.holder)

    threads = [threading.Thread(target=race, args=(leases,)) for leases in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(granted) == 1, granted


def test_holder_renews_its_lease_and_the_others_wait(engine: Engine) -> None:
    first, second = Leases(engine, "a", ttl_s=30), Leases(engine, "b", ttl_s=30)
    taken = first.acquire("job")
    assert taken is not None and taken.fresh
    renewed = first.acquire("job")
    assert renewed is not None and not renewed.fresh, "a renewal is no takeover (no recovery to run)"
    assert second.acquire("job") is None


def test_lease_of_a_holder_that_stopped_renewing_is_taken_over_after_its_ttl(engine: Engine) -> None:
    dead, alive = Leases(engine, "dead", ttl_s=1), Leases(engine, "alive", ttl_s=1)
    assert dead.acquire("rollout:7") is not None
    assert alive.acquire("rollout:7") is None
    time.sleep(1.2)
    taken = alive.acquire("rollout:7")
    assert taken is not None and taken.fresh, "taken over from another holder: the new one recovers"
    assert dead.acquire("rollout:7") is None, "the old holder, back, finds it taken"


def test_released_leases_are_free_at_once(engine: Engine) -> None:
    leaving, staying = Leases(engine, "leaving", ttl_s=60), Leases(engine, "staying", ttl_s=60)
    assert leaving.acquire("x") is not None and leaving.acquire("y") is not None
    leaving.release("x")
    assert staying.acquire("x") is not None
    assert leaving.release_all() == 1
    assert staying.acquire("y") is not None


def test_periodic_job_runs_only_in_the_replica_holding_its_lease(engine: Engine) -> None:
    runs: list[str] = []
    jobs = [
        Periodic("drift-rollups", lambda name=name: runs.append(name), 0.05, lease=Leases(engine, name, ttl_s=5))
        for name in ("a", "b", "c")
    ]
    for job in jobs:
        job.start()
    time.sleep(0.6)
    for job in jobs:
        job.stop()
    assert len(set(runs)) == 1, f"one replica runs the job, not {sorted(set(runs))}"
    assert len(runs) >= 3


def test_coordinator_alone_on_its_database_takes_no_leases(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'edgefleet.db'}")
    assert leases_for(engine, replicated=False, holder="x", ttl_s=5) is None
    with pytest.raises(ValueError, match="PostgreSQL"):
        leases_for(engine, replicated=True, holder="x", ttl_s=5)
