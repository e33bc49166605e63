"""One compression run: resolve the model sources, build each variant, measure all, gate, write the outputs.

The output directory holds `fp32.onnx` and the variant files, `variants.json` (the manifest the registry
push consumes: accepted variants only), `report.json`, `report.md` and `report.html`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compression.data import Dataset
from compression.errors import InvalidInputError
from compression.evaluate import (
    CompressionReport,
    GateVerdict,
    LatencyBudget,
    Measurement,
    gate,
    measure,
    predictions,
)
from compression.machine import read_cpu
from compression.report import build_document, render_html, render_markdown
from compression.specs import tensor_specs
from compression.variants import VARIANT_SPECS, BuiltVariant, build_variant, describe_file
from protocol.manifest import (
    MANIFEST_FORMAT_VERSION,
    ManifestEvaluation,
    ManifestLatency,
    ManifestVariant,
    RefusedVariant,
    VariantsManifest,
    write_manifest,
)
from protocol.messages import ModelFormat

__all__ = [
    "BUILTIN_MODEL",
    "CompressionJob",
    "CompressionResult",
    "ModelSources",
    "build_manifest",
    "manifest_entry",
    "resolve_model",
    "run_compression",
]

BUILTIN_MODEL = "digits-cnn"


@dataclass(frozen=True)
class ModelSources:
    """The fp32 ONNX model (baseline and source of ONNX variants) and the torch.export program (for TFLite)."""

    onnx: Path
    torch_program: Path | None


@dataclass(frozen=True)
class CompressionJob:
    """Everything one run needs, passed in (no globals)."""

    sources: ModelSources
    calibration: Dataset
    evaluation: Dataset
    variants: list[str]
    out_dir: Path
    max_drop_pp: float = 1.0
    latency: LatencyBudget = field(default_factory=LatencyBudget)
    measure_memory: bool = True


@dataclass(frozen=True)
class CompressionResult:
    """The built variants, their measurements, the gate's verdicts and where the outputs were written."""

    variants: list[BuiltVariant]
    report: CompressionReport
    verdicts: list[GateVerdict]
    document: dict[str, Any]
    manifest_path: Path

    @property
    def refused(self) -> list[GateVerdict]:
        """Verdicts of the variants the gate refused."""
        return [v for v in self.verdicts if not v.accepted]


def resolve_model(model: str, *, torch_program: Path | None, work_dir: Path) -> ModelSources:
    """Sources from MODEL: `digits-cnn` (trained now), an `.onnx` file, or a `.pt2` file, each with its sibling.

    `x.onnx` pairs with `x.pt2` beside it (and the reverse); `torch_program` overrides the pairing.
    """
    if model == BUILTIN_MODEL:
        from compression.cnn import build_reference_cnn

        built = build_reference_cnn(work_dir / "source")
        return ModelSources(onnx=built.onnx_path, torch_program=torch_program or built.program_path)
    path = Path(model)
    if path.suffix not in (".onnx", ".pt2"):
        raise InvalidInputError(f"MODEL {model!r}: expected an .onnx file, a .pt2 file or {BUILTIN_MODEL!r}")
    onnx_path, program = path.with_suffix(".onnx"), torch_program or path.with_suffix(".pt2")
    if not onnx_path.is_file():
        raise InvalidInputError(f"MODEL {model!r}: the fp32 baseline {onnx_path} does not exist")
    return ModelSources(onnx=onnx_path, torch_program=program if program.is_file() else None)


def run_compression(job: CompressionJob, progress: Callable[[str], None] = lambda _: None) -> CompressionResult:
    """Build, measure and gate every requested variant; write the manifest and reports."""
    job.out_dir.mkdir(parents=True, exist_ok=True)
    baseline_path = job.out_dir / "fp32.onnx"
    if job.sources.onnx.resolve() != baseline_path.resolve():
        shutil.copyfile(job.sources.onnx, baseline_path)
    built = [describe_file(VARIANT_SPECS["fp32"], baseline_path)]
    for name in job.variants:
        progress(f"building {name}")
        built.append(
            build_variant(
                name,
                onnx_model=job.sources.onnx,
                torch_program=job.sources.torch_program,
                calibration=job.calibration,
                out_dir=job.out_dir,
            )
        )
    reference = predictions(baseline_path, job.evaluation)
    measured: list[Measurement] = []
    for variant in built:
        progress(f"measuring {variant.name}")
        measured.append(
            measure(
                variant.name,
                variant.path,
                job.evaluation,
                reference,
                budget=job.latency,
                memory=job.measure_memory,
            )
        )
    cpu_model, flags = read_cpu()
    report = CompressionReport(measured[0], tuple(measured[1:]), cpu_model=cpu_model, isa_flags=flags)
    verdicts = gate(report, job.max_drop_pp)
    files = {v.name: v.path.name for v in built}
    document = build_document(report, verdicts, max_drop_pp=job.max_drop_pp, files=files)
    manifest_path = _write_outputs(job, build_manifest(job, built, report, verdicts), document)
    return CompressionResult(built, report, verdicts, document, manifest_path)


def manifest_entry(variant: BuiltVariant, measurement: Measurement) -> ManifestVariant:
    """One variant as the registry push reads it."""
    inputs, outputs = tensor_specs(variant.path)
    return ManifestVariant(
        name=variant.name,
        file=variant.path.name,
        format=ModelFormat(variant.format),
        precision=variant.precision,
        sha256=variant.sha256,
        size=variant.size_bytes,
        accuracy=measurement.accuracy,
        agreement=measurement.agreement,
        latency=ManifestLatency(p50_ms=measurement.latency_p50_ms, p99_ms=measurement.latency_p99_ms),
        runtime=variant.runtime,
        cpu_features=list(variant.cpu_features),
        # The tensors devices will be told to expect (what `edgefleet models push --variants` registers).
        inputs=inputs,
        outputs=outputs,
    )


def build_manifest(
    job: CompressionJob, built: list[BuiltVariant], report: CompressionReport, verdicts: list[GateVerdict]
) -> VariantsManifest:
    """The manifest of a run: the fp32 baseline and every accepted variant, and why the others were refused."""
    accepted = {"fp32"} | {v.name for v in verdicts if v.accepted}
    measurements = {m.name: m for m in (report.baseline, *report.variants)}
    return VariantsManifest(
        format_version=MANIFEST_FORMAT_VERSION,
        max_drop_pp=job.max_drop_pp,
        evaluation=ManifestEvaluation(name=job.evaluation.name, samples=len(job.evaluation)),
        variants=[manifest_entry(v, measurements[v.name]) for v in built if v.name in accepted],
        refused=[RefusedVariant(name=v.name, reason=v.reason) for v in verdicts if not v.accepted],
    )


def _write_outputs(job: CompressionJob, manifest: VariantsManifest, document: dict[str, Any]) -> Path:
    manifest_path = write_manifest(job.out_dir, manifest)
    (job.out_dir / "report.json").write_text(json.dumps(document, indent=2) + "\n")
    (job.out_dir / "report.md").write_text(render_markdown(document))
    (job.out_dir / "report.html").write_text(render_html(document))
    return manifest_path
