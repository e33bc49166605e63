"""`edgefleet compress` (mounted through the `edgefleet.commands` entry point) and `python -m compression`.

Exit codes: 0 the baseline and every requested variant were produced and passed the gate (with the default
`--to`, variants that cannot be built from this model are skipped with their reason and do not count);
1 a variant was refused by the accuracy gate; 2 bad input (model, data, options), nothing built;
3 a variant named in `--to` could not be produced (its converter is missing or failed, or it does not run).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from compression.data import BUILTIN_DATASETS, load_dataset
from compression.errors import CompressionError, InvalidInputError
from compression.evaluate import LatencyBudget
from compression.outputs import TASKS
from compression.pipeline import (
    BUILTIN_MODEL,
    TRAINABLE_FILE,
    CompressionJob,
    CompressionResult,
    ModelSources,
    resolve_model,
    run_compression,
)
from compression.profile import build_profile, write_profile
from compression.report import render_markdown
from compression.variants import missing_source, parse_variant_names
from protocol.outputs import OutputSemantics
from protocol.profiles import PROFILE_FILE

__all__ = ["EXIT_BAD_INPUT", "EXIT_CONVERTER", "EXIT_REFUSED", "app", "compress", "exit_code", "profile"]

EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2
EXIT_CONVERTER = 3
DEFAULT_VARIANTS = "int8-static,int8-dynamic,fp16,tflite-int8"
_DATA_HELP = (
    ".npz with arrays x and y (labels or regression targets), .npy of inputs only (variants judged by agreement "
    "with fp32), .csv with one sample per row and a header column named label, y or target"
)


def compress(
    model: Annotated[
        str,
        typer.Argument(
            help=f"fp32 model: an .onnx file (external data such as MODEL.onnx.data beside it is folded in; its "
            f".pt2 torch.export program beside it for TFLite variants), a .pt2 file with its .onnx beside it, or "
            f"{BUILTIN_MODEL!r} to train the reference CNN."
        ),
    ],
    calibration: Annotated[
        str | None,
        typer.Option(
            "--calibration",
            help=f"Calibration data: {_DATA_HELP}; or digits-train / digits (default: digits-train with the "
            "built-in evaluation data, else the --eval data).",
            show_default=False,
        ),
    ] = None,
    eval_data: Annotated[
        str, typer.Option("--eval", help=f"Evaluation data: {_DATA_HELP}; or digits (held-out split).")
    ] = "digits",
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            help=f"Comma-separated variants to build (default: {DEFAULT_VARIANTS}; those this model has no source "
            "for, e.g. TFLite without a .pt2, are skipped). Named variants must all be produced (else exit 3).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("compressed"),
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            help="The model output to evaluate (default: the class-probability output, or else the only class-id "
            "or value output).",
            show_default=False,
        ),
    ] = None,
    task: Annotated[
        str,
        typer.Option(
            "--task",
            help=f"One of {', '.join(TASKS)}: a classifier is judged by accuracy (agreement with fp32 without labels), "
            "a regressor by RMSE (deviation from fp32 without targets); auto decides from the output.",
        ),
    ] = "auto",
    max_drop: Annotated[
        float,
        typer.Option(
            "--max-drop",
            help="Refuse a variant more than this far behind fp32: accuracy points for a classifier (points of "
            "samples classed unlike fp32 when the data has no labels); for a regressor, % by which its RMSE "
            "exceeds fp32's (without targets: its RMSE from fp32's outputs, in % of their standard deviation).",
        ),
    ] = 1.0,
    torch_program: Annotated[
        Path | None, typer.Option("--torch-program", help="torch.export program (.pt2) for TFLite variants.")
    ] = None,
    trainable: Annotated[
        Path | None,
        typer.Option(
            "--trainable",
            help="The model's trainable form (a torch.export program with a dynamic batch axis, see "
            "compression.trainable), copied as OUT/trainable.pt2 for federated retraining (default: MODEL's "
            "x.trainable.pt2 beside it; digits-cnn writes its own).",
        ),
    ] = None,
    latency_iterations: Annotated[int, typer.Option(help="Timed single-sample runs per model (bounded).")] = 300,
    memory: Annotated[bool, typer.Option(help="Measure peak memory in a subprocess per model.")] = True,
) -> None:
    """Build quantized ONNX and TFLite variants of a model, measure them beside fp32, and gate on accuracy.

    Exit status:
    0 every requested variant was produced and passed the gate (default --to: what this model cannot give is skipped);
    1 a variant was refused by the gate;
    2 bad input (model, data, options), nothing built;
    3 a variant named in --to could not be produced.
    """
    err = _stderr()
    try:
        names = parse_variant_names(to if to is not None else DEFAULT_VARIANTS)
        if max_drop < 0:
            raise InvalidInputError(f"--max-drop must be >= 0, got {max_drop}")
        if task not in TASKS:
            raise InvalidInputError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
        with err.status("loading data and model…"):
            eval_set = load_dataset(eval_data)
            calibration_set = load_dataset(calibration or _default_calibration(eval_data))
            sources = resolve_model(model, torch_program=torch_program, work_dir=out, trainable=trainable)
        if to is not None:
            _require_sources(names, sources)
        job = CompressionJob(
            sources=sources,
            calibration=calibration_set,
            evaluation=eval_set,
            variants=names,
            out_dir=out,
            max_drop_pp=max_drop,
            latency=LatencyBudget(iterations=max(1, latency_iterations)),
            measure_memory=memory,
            output=output,
            task=task,
        )
        with err.status("compressing…") as status:
            result = run_compression(job, progress=lambda step: status.update(f"{step}…"))
    except InvalidInputError as exc:
        err.print(f"error: {exc}", style="red", markup=False, highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    except CompressionError as exc:
        err.print(f"error: {exc}", style="red", markup=False, highlight=False)
        raise typer.Exit(EXIT_CONVERTER) from exc
    typer.echo(render_markdown(result.document))
    typer.echo(f"manifest: {result.manifest_path}")
    if sources.trainable is not None:
        typer.echo(f"trainable form: {out / TRAINABLE_FILE}")
    for note in result.notes:
        err.print(f"note: {note}", markup=False, highlight=False)
    for skipped in result.skipped:
        err.print(f"skipped {skipped.name}: {skipped.reason}", style="yellow", markup=False, highlight=False)
    for verdict in result.refused:
        err.print(f"refused {verdict.name}: {verdict.reason}", style="red", markup=False, highlight=False)
    code = exit_code(result, explicit=to is not None)
    if code:
        raise typer.Exit(code)


def profile(
    model: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The model (.onnx) to profile.")],
    data: Annotated[
        str, typer.Option("--data", help=f"Reference data: {_DATA_HELP}; or digits (held-out split).")
    ] = "digits",
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the profile.")] = Path(PROFILE_FILE),
    semantics: Annotated[
        str | None,
        typer.Option(
            "--output-semantics",
            help="How the outputs read, as JSON (see `edgefleet models push --help`); default: from the graph.",
        ),
    ] = None,
) -> None:
    """Build the reference profile drift is measured against: MODEL run over reference data (ideally the data it
    was validated on), sketched as devices sketch, with accuracy and a confidence calibration when the data has
    labels. Push it with `edgefleet models push --profile FILE` (`edgefleet compress` writes one by itself)."""
    err = _stderr()
    try:
        declared = None if semantics is None else OutputSemantics.model_validate_json(semantics)
    except ValueError as exc:
        err.print(f"error: --output-semantics: {exc}", style="red", markup=False, highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    try:
        dataset = load_dataset(data)
        with err.status("profiling…"):
            built = build_profile(model, dataset, semantics=declared, source=dataset.name)
    except (CompressionError, ValueError) as exc:
        err.print(f"error: {exc}", style="red", markup=False, highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    write_profile(built, out)
    accuracy = "no labels" if built.accuracy is None else f"accuracy {100 * built.accuracy:.2f} %"
    typer.echo(
        f"wrote {out}: {built.rows} rows, {built.semantics.kind}, {len(built.sketches.features)} "
        f"{built.sketches.feature_mode} features, {accuracy}, {len(built.calibration)} calibration ranges"
    )


def _default_calibration(eval_data: str) -> str:
    """The training digits beside the built-in evaluation digits; else the user's own data calibrates too."""
    return "digits-train" if eval_data in BUILTIN_DATASETS else eval_data


def _require_sources(names: list[str], sources: ModelSources) -> None:
    """Variants named in --to whose source was not given are a usage error, found before anything is built."""
    for name in names:
        reason = missing_source(name, onnx_model=sources.onnx, torch_program=sources.torch_program)
        if reason is not None:
            raise InvalidInputError(f"variant {name} cannot be built: {reason}")


def exit_code(result: CompressionResult, *, explicit: bool) -> int:
    """0, `EXIT_CONVERTER` when a variant named in --to was not produced, else `EXIT_REFUSED` if one was refused."""
    if explicit and result.skipped:
        return EXIT_CONVERTER
    return EXIT_REFUSED if result.refused else 0


def _stderr() -> Console:
    return Console(stderr=True, file=sys.stderr, soft_wrap=True)


app = typer.Typer(add_completion=False, help="Compress a model into quantized variants.")
app.command()(compress)
