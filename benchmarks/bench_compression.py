"""Benchmark: fp32 vs int8-static vs int8-dynamic vs fp16 vs tflite-int8 on the reference digits CNN, in one run.

Prints size ratio to fp32, accuracy, p50 latency ratio to fp32 (single sample, single thread, after warm-up),
peak memory of a fresh process running each model, and the CPU's ISA flags (int8 speed depends on VNNI).

    .venv/bin/python benchmarks/bench_compression.py [--iterations 2000] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from compression.data import load_dataset
from compression.evaluate import LatencyBudget
from compression.pipeline import CompressionJob, resolve_model, run_compression

VARIANTS = ["int8-static", "int8-dynamic", "fp16", "tflite-int8"]


def main() -> int:
    """Train the reference CNN, build the variants, measure them and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000, help="timed single-sample runs per model")
    parser.add_argument("--seconds", type=float, default=5.0, help="time cap of the latency loop per model")
    parser.add_argument("--out", type=Path, default=None, help="keep the variants and reports here")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-compression-"))
    started = time.perf_counter()
    job = CompressionJob(
        sources=resolve_model("digits-cnn", torch_program=None, work_dir=out),
        calibration=load_dataset("digits-train"),
        evaluation=load_dataset("digits"),
        variants=VARIANTS,
        out_dir=out,
        latency=LatencyBudget(warmup=100, iterations=args.iterations, seconds=args.seconds),
    )
    result = run_compression(job, progress=lambda step: print(f"  {step}", flush=True))
    report = result.report
    print()
    print(f"CPU: {report.cpu_model}; ISA flags: {', '.join(report.isa_flags) or '-'}")
    elapsed = time.perf_counter() - started
    print(f"eval: {len(job.evaluation)} held-out digits; latency: 1 sample, 1 thread; wall time {elapsed:.1f} s")
    header = (
        f"{'model':<13}{'size B':>9}{'size/fp32':>11}{'accuracy':>10}{'agree':>8}{'p50 us':>9}{'p99 us':>9}"
        f"{'p50/fp32':>10}{'peak MiB':>10}{'model MiB':>11}"
    )
    print(header)
    print("-" * len(header))
    base = report.baseline
    for m in (base, *report.variants):
        print(
            f"{m.name:<13}{m.size_bytes:>9,}{m.size_bytes / base.size_bytes:>11.2f}{m.accuracy:>10.2%}"
            f"{m.agreement:>8.1%}{m.latency_p50_ms * 1000:>9.1f}{m.latency_p99_ms * 1000:>9.1f}"
            f"{m.latency_p50_ms / base.latency_p50_ms:>10.2f}{(m.peak_rss_bytes or 0) / 2**20:>10.1f}"
            f"{(m.model_rss_bytes or 0) / 2**20:>11.1f}"
        )
    refused = ", ".join(v.name for v in result.refused) or "none"
    print(f"gate (max drop {job.max_drop_pp:g} pp): refused {refused}; reports in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
