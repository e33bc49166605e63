"""Run in a fresh process: import the runtime, note RSS, load the model, infer, note peak RSS; print JSON.

`python -m compression._probe MODEL`. Peak resident memory is the kernel's high-water mark `VmHWM` from
`/proc/self/status`, so it covers native allocations of the runtime that tracemalloc cannot see. Not
`ru_maxrss`: Linux carries that across fork and exec, so a child of a big parent reports the parent's
peak. The baseline is the high-water mark after the runtime is imported and before the model loads.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import numpy as np


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # outside Linux: best available


def main(argv: list[str]) -> int:
    """Measure one model; prints `{"baseline_rss_bytes": ..., "peak_rss_bytes": ...}`."""
    path = Path(argv[0])
    if path.suffix == ".onnx":
        import onnxruntime  # noqa: F401
    else:
        import ai_edge_litert.interpreter  # noqa: F401
    from compression.runtimes import open_classifier

    baseline = _peak_rss_bytes()
    classifier = open_classifier(path)
    sample = np.zeros((1, *classifier.sample_shape), dtype=np.float32)
    for _ in range(10):
        classifier.predict_one(sample)
    print(json.dumps({"baseline_rss_bytes": baseline, "peak_rss_bytes": _peak_rss_bytes()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
