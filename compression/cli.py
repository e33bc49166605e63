"""`edgefleet compress` (mounted through the `edgefleet.commands` entry point) and `python -m compression`.

Exit codes: 0 every variant passed the gate; 1 a variant was refused by the accuracy gate;
2 bad input (model, data, variant names); 3 a converter is missing or failed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from compression.data import load_dataset
from compression.errors import CompressionError, InvalidInputError
from compression.evaluate import LatencyBudget
from compression.pipeline import BUILTIN_MODEL, CompressionJob, resolve_model, run_compression
from compression.report import render_markdown
from compression.variants import parse_variant_names

__all__ = ["EXIT_BAD_INPUT", "EXIT_CONVERTER", "EXIT_REFUSED", "app", "compress"]

EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2
EXIT_CONVERTER = 3
DEFAULT_VARIANTS = "int8-static,int8-dynamic,fp16,tflite-int8"


def compress(
    model: Annotated[
        str,
        typer.Argument(
            help=f"fp32 model: an .onnx file (with its .pt2 torch.export program beside it for TFLite variants), "
            f"a .pt2 file with its .onnx beside it, or {BUILTIN_MODEL!r} to train the reference CNN."
        ),
    ],
    calibration: Annotated[
        str, typer.Option("--calibration", help="Calibration data: .npz with x, y, or digits-train / digits.")
    ] = "digits-train",
    eval_data: Annotated[
        str, typer.Option("--eval", help="Evaluation data: .npz with x, y, or digits (held-out split).")
    ] = "digits",
    to: Annotated[str, typer.Option("--to", help="Comma-separated variants to build.")] = DEFAULT_VARIANTS,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("compressed"),
    max_drop: Annotated[
        float, typer.Option("--max-drop", help="Refuse a variant more than this many accuracy points below fp32.")
    ] = 1.0,
    torch_program: Annotated[
        Path | None, typer.Option("--torch-program", help="torch.export program (.pt2) for TFLite variants.")
    ] = None,
    latency_iterations: Annotated[int, typer.Option(help="Timed single-sample runs per model (bounded).")] = 300,
    memory: Annotated[bool, typer.Option(help="Measure peak memory in a subprocess per model.")] = True,
) -> None:
    """Build quantized ONNX and TFLite variants of a model, measure them beside fp32, and gate on accuracy."""
    err = _stderr()
    try:
        names = parse_variant_names(to)
        if max_drop < 0:
            raise InvalidInputError(f"--max-drop must be >= 0, got {max_drop}")
        with err.status("loading data and model…"):
            calibration_set = load_dataset(calibration)
            eval_set = load_dataset(eval_data)
            sources = resolve_model(model, torch_program=torch_program, work_dir=out)
        job = CompressionJob(
            sources=sources,
            calibration=calibration_set,
            evaluation=eval_set,
            variants=names,
            out_dir=out,
            max_drop_pp=max_drop,
            latency=LatencyBudget(iterations=max(1, latency_iterations)),
            measure_memory=memory,
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
    if result.refused:
        for verdict in result.refused:
            err.print(f"refused {verdict.name}: {verdict.reason}", style="red", markup=False, highlight=False)
        raise typer.Exit(EXIT_REFUSED)


def _stderr() -> Console:
    return Console(stderr=True, file=sys.stderr, soft_wrap=True)


app = typer.Typer(add_completion=False, help="Compress a model into quantized variants.")
app.command()(compress)
