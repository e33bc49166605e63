"""Build a federated run's candidate on disk: the parent's trainable form with the aggregated weights, exported and
compressed into the parent's variants exactly as `edgefleet compress` does (`compression.pipeline`).

The output directory is what `edgefleet models push --variants` pushes: `fp32.onnx` and the accepted variants,
`variants.json`, the reports, and `trainable.pt2` (the candidate's own trainable form, for its next run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compression.data import Dataset, load_dataset
from compression.evaluate import LatencyBudget
from compression.pipeline import CompressionJob, CompressionResult, ModelSources, run_compression
from compression.trainable import (
    export_fixed_program,
    export_onnx_from_trainable,
    export_trainable,
    input_shape,
    load_state_npz,
    load_trainable,
)
from compression.variants import VARIANT_SPECS

__all__ = ["CandidateBuild", "build_candidate", "parent_accuracy"]

SYNTHETIC_SAMPLES = 64  # inputs the fp32-only path measures latency on when there is no evaluation data


@dataclass(frozen=True)
class CandidateBuild:
    """The compression run of the candidate and the data it was judged on."""

    result: CompressionResult
    evaluation: Dataset
    out_dir: Path


def build_candidate(
    *,
    parent_trainable: Path,
    final_npz: Path,
    input_name: str,
    output_name: str,
    variants: list[str],
    evaluation: str | None,
    calibration: str | None,
    out_dir: Path,
    work_dir: Path,
    max_drop_pp: float = 1.0,
    latency_iterations: int = 300,
    measure_memory: bool = True,
    progress: Callable[[str], None] = lambda _: None,
) -> CandidateBuild:
    """Apply `final_npz` to the parent's trainable form, export it into `work_dir`, and compress it into `out_dir`
    (fp32 only without evaluation data)."""
    import torch

    work = work_dir
    shape = input_shape(parent_trainable)
    progress(f"applying the aggregated weights to the parent's trainable form (input {list(shape)})")
    module = load_state_npz(load_trainable(parent_trainable), final_npz)
    example = torch.zeros(1, *shape)
    progress("exporting the candidate: ONNX, trainable form")
    onnx_path = export_onnx_from_trainable(module, input_name, output_name, work / "candidate.onnx", example)
    trainable = export_trainable(module, example, work / "candidate.trainable.pt2")
    program = None
    if any(VARIANT_SPECS[name].source == "torch" for name in variants):
        program = export_fixed_program(module, example, work / "candidate.pt2")
    if evaluation is None:
        eval_set = Dataset(np.random.default_rng(0).normal(size=(SYNTHETIC_SAMPLES, *shape)), None, "synthetic")
        calibration_set, variants = eval_set, []
    else:
        eval_set, calibration_set = load_dataset(evaluation), load_dataset(calibration or evaluation)
    job = CompressionJob(
        sources=ModelSources(onnx=onnx_path, torch_program=program, trainable=trainable),
        calibration=calibration_set,
        evaluation=eval_set,
        variants=variants,
        out_dir=out_dir,
        max_drop_pp=max_drop_pp,
        latency=LatencyBudget(iterations=max(1, latency_iterations)),
        measure_memory=measure_memory,
    )
    result = run_compression(job, progress=lambda step: progress(f"compression: {step}"))
    return CandidateBuild(result=result, evaluation=eval_set, out_dir=out_dir)


def parent_accuracy(parent_trainable: Path, evaluation: Dataset) -> float | None:
    """The parent's accuracy on labelled evaluation data (classifiers: argmax of the output), for the card."""
    import torch

    if evaluation.y is None or not np.issubdtype(evaluation.y.dtype, np.integer):
        return None
    module = load_trainable(parent_trainable)
    x = evaluation.shaped(input_shape(parent_trainable))
    with torch.no_grad():
        logits = torch.cat([module(torch.from_numpy(x[i : i + 1024])) for i in range(0, len(x), 1024)])
    return float((logits.argmax(-1).numpy() == evaluation.y).mean())
