"""A sampling profiler for a whole process, loaded by putting this directory on PYTHONPATH (no code change).

Every `EDGEFLEET_SAMPLE_S` seconds (default 0.005) it reads the stack of every thread (`sys._current_frames`) and
counts, per thread name, each function seen (inclusive) and the innermost one (self); every 5 s and at exit it
writes the top entries to `EDGEFLEET_SAMPLE_OUT` as JSON. Threads that sleep in a wait are counted too: read a
function's share of the samples of *its* thread. Used by `bench_rollout.py --profile`.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
from collections import Counter

_OUT = os.environ.get("EDGEFLEET_SAMPLE_OUT")
_IDLE = ("wait", "select", "poll", "_wait_for_tstate_lock", "get", "sleep", "accept", "readline", "recv", "acquire")


def _where(code: object) -> str:
    return f"{code.co_filename.rsplit('site-packages/', 1)[-1]}:{code.co_name}"  # type: ignore[attr-defined]


def _start(out: str) -> None:
    interval = float(os.environ.get("EDGEFLEET_SAMPLE_S", "0.005"))
    inclusive: dict[str, Counter[str]] = {}
    innermost: dict[str, Counter[str]] = {}
    totals: Counter[str] = Counter()
    me = threading.get_ident()

    def dump() -> None:
        report = {
            name: {
                "samples": totals[name],
                "self": innermost[name].most_common(25),
                "inclusive": inclusive[name].most_common(40),
            }
            for name in totals
        }
        with open(out + ".tmp", "w") as fh:
            json.dump(report, fh, indent=1)
        os.replace(out + ".tmp", out)

    def sample() -> None:
        last_dump = time.monotonic()
        while True:
            time.sleep(interval)
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                name = names.get(ident, "?")
                if frame.f_code.co_name in _IDLE:
                    continue  # waiting, not working
                totals[name] += 1
                innermost.setdefault(name, Counter())[_where(frame.f_code)] += 1
                seen = set()
                f = frame
                while f is not None:
                    seen.add(_where(f.f_code))
                    f = f.f_back
                inclusive.setdefault(name, Counter()).update(seen)
            if time.monotonic() - last_dump > 5:
                last_dump = time.monotonic()
                dump()

    threading.Thread(target=sample, name="sampler", daemon=True).start()
    atexit.register(dump)


if _OUT:
    _start(_OUT)
