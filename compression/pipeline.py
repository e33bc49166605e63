"""One compression run: resolve the model sources, build each variant, measure all, gate, write the outputs.

The output directory holds `fp32.onnx` (self-contained: external weights folded in) and the variant files,
`variants.json` (the manifest the registry push consumes: accepted variants only), `report.json`, `report.md`
and `report.html`; and `trainable.pt2`, the model's trainable form (`compression.trainable`) when one was given,
which `edgefleet models push --variants` stores beside the variants for federated retraining; and
`reference_profile.json`, the fp32 model's reference profile over the evaluation data (`compression.profile`),
which the push stores and signs with the version (drift is measured against it). A variant that
cannot be built (no source for it, a converter missing or failing) or that does not run once built is skipped
with its reason; it never stops the others.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compression.baseline import self_contained_copy
from compression.data import Dataset
from compression.errors import CompressionError, InvalidInputError
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
from compression.outputs import EvaluatedOutput, choose_output, read_model_tensors
from compression.profile import build_profile, write_profile
from compression.report import build_document, render_html, render_markdown
from compression.scoring import score
from compression.specs import tensor_specs
from compression.variants import VARIANT_SPECS, BuiltVariant, build_variant, describe_file, missing_source
from protocol.manifest import (
    MANIFEST_FORMAT_VERSION,
    ManifestEvaluation,
    ManifestLatency,
    ManifestVariant,
    RefusedVariant,
    VariantsManifest,
    write_manifest,
)
from protocol.messages import ModelFormat, TensorSpec
from protocol.profiles import PROFILE_FILE

__all__ = [
    "BUILTIN_MODEL",
    "TRAINABLE_FILE",
    "CompressionJob",
    "CompressionResult",
    "ModelSources",
    "SkippedVariant",
    "build_manifest",
    "manifest_entry",
    "resolve_model",
    "run_compression",
]

BUILTIN_MODEL = "digits-cnn"
TRAINABLE_FILE = "trainable.pt2"  # the trainable form in the output directory
TRAINABLE_SUFFIX = ".trainable.pt2"  # `x.onnx` pairs with `x.trainable.pt2` beside it


@dataclass(frozen=True)
class ModelSources:
    """The fp32 ONNX model (baseline and source of ONNX variants), the torch.export program (for TFLite) and the
    trainable form (a torch.export program with a dynamic batch axis, copied as `trainable.pt2`)."""

    onnx: Path
    torch_program: Path | None
    trainable: Path | None = None


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
    output: str | None = None  # the output to evaluate; None: found from the model (`compression.outputs`)
    task: str = "auto"  # "auto", "classification" or "regression"


@dataclass(frozen=True)
class SkippedVariant:
    """A requested variant that was not produced, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class CompressionResult:
    """The built variants, their measurements, the gate's verdicts and where the outputs were written."""

    variants: list[BuiltVariant]
    report: CompressionReport
    verdicts: list[GateVerdict]
    document: dict[str, Any]
    manifest_path: Path
    skipped: list[SkippedVariant] = field(default_factory=list)
    target: EvaluatedOutput | None = None
    notes: list[str] = field(default_factory=list)  # what the user should know (e.g. a fixed batch)

    @property
    def refused(self) -> list[GateVerdict]:
        """Verdicts of the variants the gate refused."""
        return [v for v in self.verdicts if not v.accepted]


def resolve_model(
    model: str, *, torch_program: Path | None, work_dir: Path, trainable: Path | None = None
) -> ModelSources:
    """Sources from MODEL: `digits-cnn` (trained now), an `.onnx` file, or a `.pt2` file, each with its sibling.

    `x.onnx` pairs with `x.pt2` beside it (and the reverse), and with the trainable form `x.trainable.pt2`;
    `torch_program` and `trainable` override the pairing.
    """
    if trainable is not None and not trainable.is_file():
        raise InvalidInputError(f"--trainable {trainable}: no such file")
    if model == BUILTIN_MODEL:
        from compression.cnn import build_reference_cnn

        built = build_reference_cnn(work_dir / "source")
        return ModelSources(
            onnx=built.onnx_path,
            torch_program=torch_program or built.program_path,
            trainable=trainable or built.trainable_path,
        )
    path = Path(model)
    if path.suffix not in (".onnx", ".pt2"):
        raise InvalidInputError(f"MODEL {model!r}: expected an .onnx file, a .pt2 file or {BUILTIN_MODEL!r}")
    onnx_path, program = path.with_suffix(".onnx"), torch_program or path.with_suffix(".pt2")
    if not onnx_path.is_file():
        raise InvalidInputError(f"MODEL {model!r}: the fp32 baseline {onnx_path} does not exist")
    paired = path.with_name(path.stem + TRAINABLE_SUFFIX)
    return ModelSources(
        onnx=onnx_path,
        torch_program=program if program.is_file() else None,
        trainable=trainable or (paired if paired.is_file() else None),
    )


def run_compression(job: CompressionJob, progress: Callable[[str], None] = lambda _: None) -> CompressionResult:
    """Build, measure and gate every requested variant (skipping those that cannot be); write manifest and reports."""
    job.out_dir.mkdir(parents=True, exist_ok=True)
    baseline_path = self_contained_copy(job.sources.onnx, job.out_dir / "fp32.onnx")
    inputs, outputs = read_model_tensors(baseline_path)
    target = choose_output(outputs, requested=job.output, task=job.task)
    notes = _batch_notes(inputs[0])
    progress(f"evaluating fp32 ({target.task}, output {target.name!r})")
    reference = predictions(baseline_path, job.evaluation, target)
    score(target, reference, reference, job.evaluation.y)  # refuses labels that do not fit now, not after building
    built = [describe_file(VARIANT_SPECS["fp32"], baseline_path)]
    skipped: list[SkippedVariant] = []
    for name in job.variants:
        variant = _build(job, name, baseline_path, skipped, progress)
        if variant is not None:
            built.append(variant)
    measured: list[Measurement] = []
    for variant in built:
        progress(f"measuring {variant.name}")
        try:
            measured.append(
                measure(
                    variant.name,
                    variant.path,
                    job.evaluation,
                    reference,
                    budget=job.latency,
                    memory=job.measure_memory,
                    target=target,
                )
            )
        except CompressionError as exc:
            if variant.name == "fp32":
                raise
            skipped.append(SkippedVariant(variant.name, f"built, but it does not run: {exc}"))
            variant.path.unlink(missing_ok=True)
    built = [v for v in built if v.name in {m.name for m in measured}]
    skipped.sort(key=lambda s: job.variants.index(s.name))
    cpu_model, flags = read_cpu()
    report = CompressionReport(measured[0], tuple(measured[1:]), cpu_model=cpu_model, isa_flags=flags)
    verdicts = gate(report, job.max_drop_pp)
    files = {v.name: v.path.name for v in built}
    document = build_document(
        report,
        verdicts,
        max_drop_pp=job.max_drop_pp,
        files=files,
        skipped={s.name: s.reason for s in skipped},
        evaluated={"output": target.name, "task": target.task, "read_as": target.kind.value},
        notes=notes,
    )
    manifest_path = _write_outputs(job, build_manifest(job, built, report, verdicts), document)
    # Not listed in variants.json (the manifest has no place for it yet): the push looks for it by name, so a
    # trainable form left by an earlier run into the same directory must not stay behind.
    if job.sources.trainable is not None:
        shutil.copyfile(job.sources.trainable, job.out_dir / TRAINABLE_FILE)
    else:
        (job.out_dir / TRAINABLE_FILE).unlink(missing_ok=True)
    _write_reference_profile(job, baseline_path, progress)
    return CompressionResult(built, report, verdicts, document, manifest_path, skipped, target, notes)


def _write_reference_profile(job: CompressionJob, baseline_path: Path, progress: Callable[[str], None]) -> None:
    """`reference_profile.json`: the fp32 model over the evaluation data, sketched as devices sketch (drift's
    reference). A model the profile cannot read is still compressed: the push then simply has no profile."""
    target = job.out_dir / PROFILE_FILE
    target.unlink(missing_ok=True)  # never leave an earlier run's profile beside this run's variants
    progress("profiling fp32 on the evaluation data (drift reference)")
    try:
        profile = build_profile(baseline_path, job.evaluation, source=job.evaluation.name)
    except (CompressionError, ValueError) as exc:
        progress(f"no reference profile: {exc}")
        return
    write_profile(profile, target)


def _batch_notes(model_input: TensorSpec) -> list[str]:
    """What a user should know about the model's batch: a fixed one limits what its ONNX variants serve."""
    batch = model_input.shape[0] if model_input.shape else -1
    if batch < 0:
        return []
    return [
        f"the fp32 model takes a fixed batch of {batch} (input {model_input.name!r} {model_input.shape}), so its "
        "ONNX variants serve that batch only; export it with a dynamic batch axis (torch.onnx.export(..., "
        "dynamic_shapes=...)) to serve any"
    ]


def _build(
    job: CompressionJob,
    name: str,
    baseline: Path,
    skipped: list[SkippedVariant],
    progress: Callable[[str], None],
) -> BuiltVariant | None:
    """Variant `name`, or None after noting in `skipped` why it could not be built."""
    reason = missing_source(name, onnx_model=baseline, torch_program=job.sources.torch_program)
    if reason is not None:
        skipped.append(SkippedVariant(name, reason))
        return None
    progress(f"building {name}")
    try:
        return build_variant(
            name,
            onnx_model=baseline,
            torch_program=job.sources.torch_program,
            calibration=job.calibration,
            out_dir=job.out_dir,
        )
    except CompressionError as exc:
        skipped.append(SkippedVariant(name, str(exc)))
        (job.out_dir / f"{name}{VARIANT_SPECS[name].suffix}").unlink(missing_ok=True)  # a half-written file
        return None


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
