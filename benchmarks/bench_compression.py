"""Benchmark: fp32 vs int8-static vs int8-dynamic vs fp16 vs tflite-int8, on a call-bound and a compute-bound model.

Two models, each through `edgefleet compress`'s own pipeline (`compression.pipeline.run_compression`):

- `digits`: the reference digits CNN (~11 µs per inference: call overhead dominates), trained now; accuracy on
  the held-out digits.
- `mobilenet`: MobileNetV2 on 1x3x128x128 (`compression.mobilenet`, random seeded weights; about a
  millisecond of convolutions), calibrated and evaluated on generated images; tflite-int8 only with
  `--mobilenet-tflite` (its conversion alone takes over a minute). No labels, so no accuracy; its agreement with
  fp32 is printed but says little (an untrained network amplifies any perturbation), the SQNR of its logits
  against fp32's says how much quantization noise reaches the output.

Prints per model: size ratio to fp32, accuracy, agreement, p50 latency ratio to fp32 (one sample per call, one
intra-op thread, after warm-up), peak memory of a fresh process running each model, and the CPU's ISA flags
(int8 speed depends on VNNI).

    .venv/bin/python benchmarks/bench_compression.py [--models digits,mobilenet] [--mobilenet-tflite]
        [--iterations 2000] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from compression.data import load_dataset
from compression.evaluate import LatencyBudget
from compression.pipeline import CompressionJob, CompressionResult, resolve_model, run_compression
from compression.runtimes import open_classifier

VARIANTS = ["int8-static", "int8-dynamic", "fp16", "tflite-int8"]
MODELS = ("digits", "mobilenet")
MOBILENET_VARIANTS = ["int8-static", "int8-dynamic", "fp16"]  # tflite-int8 on request: its conversion is slow
MOBILENET_EVAL_IMAGES = 200


def main() -> int:
    """Build each model's variants, measure them and print one table per model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--iterations", type=int, default=2000, help="timed single-sample runs per model")
    parser.add_argument("--seconds", type=float, default=5.0, help="time cap of the latency loop per model")
    parser.add_argument("--out", type=Path, default=None, help="keep the variants and reports here")
    parser.add_argument(
        "--mobilenet-tflite",
        action="store_true",
        help="also convert MobileNet to tflite-int8 (litert-torch: over a minute on 2 cores, more under load)",
    )
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - set(MODELS):
        parser.error(f"--models: choose from {', '.join(MODELS)}")
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-compression-"))
    budget = LatencyBudget(warmup=100, iterations=args.iterations, seconds=args.seconds)
    for model in models:
        started = time.perf_counter()
        print(f"== {model}", flush=True)
        if model == "digits":
            _report_digits(out / model, budget, started)
        else:
            variants = [*MOBILENET_VARIANTS, *(["tflite-int8"] if args.mobilenet_tflite else [])]
            _report_mobilenet(out / model, budget, started, variants)
        print()
    return 0


_STARTED = time.perf_counter()


def _progress(step: str) -> None:
    print(f"  {time.perf_counter() - _STARTED:6.1f} s  {step}", flush=True)


def _report_digits(out: Path, budget: LatencyBudget, started: float) -> None:
    job = CompressionJob(
        sources=resolve_model("digits-cnn", torch_program=None, work_dir=out),
        calibration=load_dataset("digits-train"),
        evaluation=load_dataset("digits"),
        variants=VARIANTS,
        out_dir=out,
        latency=budget,
    )
    result = run_compression(job, progress=_progress)
    _print_header(result)
    elapsed = time.perf_counter() - started
    print(f"eval: {len(job.evaluation)} held-out digits; latency: 1 sample, 1 thread; wall time {elapsed:.1f} s")
    _print_table(result, extra={})
    _print_gate(result, job)


def _report_mobilenet(out: Path, budget: LatencyBudget, started: float, variants: list[str]) -> None:
    from compression.mobilenet import build_mobilenet, generated_images

    _progress("exporting MobileNetV2 (random weights)")
    files = build_mobilenet(out / "source")
    job = CompressionJob(
        sources=resolve_model(str(files.onnx_path), torch_program=files.program_path, work_dir=out),
        calibration=generated_images(256, seed=1, name="generated-calibration"),
        evaluation=generated_images(MOBILENET_EVAL_IMAGES, seed=2, name="generated-evaluation"),
        variants=variants,
        out_dir=out,
        latency=budget,
        task="classification",
    )
    result = run_compression(job, progress=_progress)
    _progress("computing the logits' SQNR")
    extra = _sqnr(result, job)
    _print_header(result)
    elapsed = time.perf_counter() - started
    print(
        f"eval: {len(job.evaluation)} generated images (no labels); latency: 1 sample, 1 thread; "
        f"wall time {elapsed:.1f} s"
    )
    _print_table(result, extra=extra, extra_heads=("SQNR dB",))
    _print_gate(result, job)
    print("(random weights: agreement, and the gate's verdicts on it, say nothing of a trained network's quality)")


def _sqnr(result: CompressionResult, job: CompressionJob) -> dict[str, tuple[str, ...]]:
    """Per variant: the SQNR of its logits against fp32's (signal over the difference, in dB)."""
    logits = {v.name: open_classifier(v.path).predict(job.evaluation.x) for v in result.variants}
    reference = logits["fp32"]
    extra: dict[str, tuple[str, ...]] = {}
    for name, values in logits.items():
        noise = float(np.linalg.norm(values - reference))
        extra[name] = ("-",) if noise == 0 else (f"{20 * math.log10(float(np.linalg.norm(reference)) / noise):.1f}",)
    return extra


def _print_header(result: CompressionResult) -> None:
    report = result.report
    print()
    print(f"CPU: {report.cpu_model}; ISA flags: {', '.join(report.isa_flags) or '-'}")


def _print_table(
    result: CompressionResult, *, extra: dict[str, tuple[str, ...]], extra_heads: tuple[str, ...] = ()
) -> None:
    header = (
        f"{'model':<13}{'size B':>11}{'size/fp32':>11}{'accuracy':>10}{'agree':>8}{'p50 us':>9}{'p99 us':>9}"
        f"{'p50/fp32':>10}{'peak MiB':>10}{'model MiB':>11}" + "".join(f"{h:>13}" for h in extra_heads)
    )
    print(header)
    print("-" * len(header))
    base = result.report.baseline
    for m in (base, *result.report.variants):
        accuracy = "-" if m.accuracy is None else f"{m.accuracy:.2%}"
        agreement = "-" if m.agreement is None else f"{m.agreement:.1%}"
        print(
            f"{m.name:<13}{m.size_bytes:>11,}{m.size_bytes / base.size_bytes:>11.2f}{accuracy:>10}"
            f"{agreement:>8}{m.latency_p50_ms * 1000:>9.1f}{m.latency_p99_ms * 1000:>9.1f}"
            f"{m.latency_p50_ms / base.latency_p50_ms:>10.2f}{(m.peak_rss_bytes or 0) / 2**20:>10.1f}"
            f"{(m.model_rss_bytes or 0) / 2**20:>11.1f}" + "".join(f"{cell:>13}" for cell in extra.get(m.name, ()))
        )


def _print_gate(result: CompressionResult, job: CompressionJob) -> None:
    refused = ", ".join(v.name for v in result.refused) or "none"
    skipped = "".join(f"; skipped {s.name}: {s.reason}" for s in result.skipped)
    print(f"gate (max drop {job.max_drop_pp:g} pp): refused {refused}{skipped}; reports in {job.out_dir}")


if __name__ == "__main__":
    raise SystemExit(main())
