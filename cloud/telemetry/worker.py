"""`python -m cloud.telemetry.worker`: one extra ingest process of the coordinator (`cloud.telemetry.processes`).

It reads its configuration as one JSON line on stdin (never argv, where `ps` shows it: the broker and database
URLs may hold passwords) and runs an `MqttBridge` restricted to telemetry, taken through the coordinator's shared
subscription, so batching, outage waits, acknowledgements and counters are the bridge's own code. It writes what
its counters grew by to stdout as JSON lines (`{"counters": ...}`, every `REPORT_S`; the coordinator adds them to
its own) and its logs to stderr as JSON lines, which the coordinator logs as its own. It stops when stdin ends (the
coordinator closed it, or died and the pipe closed with it: it never outlives its coordinator) or on SIGTERM.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict

from cloud.bridge import BridgeTls, MqttBridge
from cloud.db import create_db_engine
from cloud.logs import configure_logging
from cloud.telemetry.counters import IngestCounters, since
from protocol.topics import Channel, Topics

__all__ = ["REPORT_S", "WorkerConfig", "main", "run"]

log = logging.getLogger("cloud.telemetry.worker")  # not `__main__` when run with -m

REPORT_S = 0.5  # how often the counters' growth goes to the coordinator


class WorkerConfig(BaseModel):
    """What an ingest process needs: the bridge's broker, identity, database and batching, and its place."""

    model_config = ConfigDict(frozen=True)

    index: int  # 1..N-1 (the coordinator's own bridge is 0)
    url: str
    topic_base: str
    database_url: str
    client_id: str
    share_group: str
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    gap_grace_s: float
    batch_max: int
    batch_wait_s: float
    bucket_s: int
    log_level: str = "INFO"

    @property
    def tls(self) -> BridgeTls | None:
        """The bridge's TLS files (the coordinator's own certificate), if any."""
        if self.tls_ca is None or self.tls_cert is None or self.tls_key is None:
            return None
        return BridgeTls(ca=Path(self.tls_ca), cert=Path(self.tls_cert), key=Path(self.tls_key))


def run(config: WorkerConfig, stdin: IO[bytes], stdout: IO[str]) -> int:
    """Ingest telemetry until `stdin` ends or SIGTERM (main thread only); 0 after a clean stop."""
    ended = threading.Event()

    def watch_stdin() -> None:
        stdin.read()  # until the coordinator closes it or dies
        ended.set()

    threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: ended.set())
    engine = create_db_engine(config.database_url)  # the coordinator migrated it before starting this process
    counters = IngestCounters()
    bridge = MqttBridge(
        url=config.url,
        topics=Topics(config.topic_base),
        engine=engine,
        counters=counters,
        client_id=config.client_id,
        tls=config.tls,
        gap_grace_s=config.gap_grace_s,
        batch_max=config.batch_max,
        batch_wait_s=config.batch_wait_s,
        bucket_s=config.bucket_s,
        channels=(Channel.TELEMETRY,),
        share_group=config.share_group,
        share_telemetry=True,
    )
    # Before the bridge starts: what it counts from its first connect on (which can come before the next line runs)
    # is reported, not taken for what was reported already.
    reported = counters.snapshot()
    bridge.start()
    log.info("ingest process started index=%d client_id=%s", config.index, config.client_id)
    try:
        while not ended.wait(REPORT_S):
            reported = _report(counters, reported, stdout)
    finally:
        bridge.stop()
        _report(counters, reported, stdout)
        engine.dispose()
    log.info("ingest process stopped index=%d", config.index)
    return 0


def _report(counters: IngestCounters, reported: dict[str, Any], stdout: IO[str]) -> dict[str, Any]:
    """Write what the counters grew by since `reported`; the new snapshot."""
    now = counters.snapshot()
    delta = since(now, reported)
    if any(delta.values()):
        stdout.write(json.dumps({"counters": delta}) + "\n")
        stdout.flush()
    return now


def main() -> int:
    """Read the configuration line from stdin, then `run`."""
    line = sys.stdin.buffer.readline()
    if not line:
        print("cloud.telemetry.worker: no configuration on stdin (the coordinator starts this)", file=sys.stderr)
        return 2
    config = WorkerConfig.model_validate_json(line)
    configure_logging(level=config.log_level, json_lines=True)
    try:
        return run(config, sys.stdin.buffer, sys.stdout)
    except BrokenPipeError:  # the coordinator is gone while a report was written
        return 0


if __name__ == "__main__":
    sys.exit(main())
