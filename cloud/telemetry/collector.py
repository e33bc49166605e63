"""The cyclic garbage collector of a process that ingests telemetry: full collections paced by the heap, not by batches.

A batch of windows is decoded and stored as a whole (up to `batch_max`, 500): its windows (~10 tracked containers
each: the pydantic models, their dicts and field sets, the rows built from them) outlive the two young collections
that the batch's own allocations set off, so they are promoted to the oldest generation, where they die by reference
count right after the batch. CPython (3.11) counts them as new long-lived objects anyway and, with the default third
threshold (10), runs a full collection over the whole heap as soon as they reach a quarter of it: measured in
`benchmarks/bench_ingest.py` (20,000 windows, SQLite), 6 full collections costing ~27 µs of CPU a window of ~159 µs
in the bridge's process; with the third threshold at 100, none in the run and 116-135 µs a window in all.

A full collection still comes once 100 collections of the middle generation have run and the promoted objects exceed a
quarter of the heap, so cyclic garbage that reached the oldest generation waits ~10x longer in allocations (not in
time: under load that is well under a second), which is what it costs.
"""

from __future__ import annotations

import gc

__all__ = ["FULL_COLLECTION_EVERY", "pace_full_collections"]

FULL_COLLECTION_EVERY = 100  # middle-generation collections before a full one is considered (CPython's default: 10)


def pace_full_collections() -> None:
    """Raise the collector's third threshold to `FULL_COLLECTION_EVERY`; a higher one (or a disabled collector, the
    process owner's choice) is left as it is."""
    first, second, third = gc.get_threshold()
    if gc.isenabled() and third < FULL_COLLECTION_EVERY:
        gc.set_threshold(first, second, FULL_COLLECTION_EVERY)
