"""`python -m federated.candidate RUN_ID`: turn a completed federated run into a registered candidate version.

The coordinator starts it when Flower reports the run `finished:completed`, with `EDGEFLEET_URL` and
`EDGEFLEET_TOKEN` in the environment. It reads the run, loads the parent's trainable form and the run's
`final.npz`, builds the candidate (`federated.build`: ONNX, trainable form, the parent's variants through the
accuracy gate), pushes it as `<parent>-fl.<run id>` with a model card carrying lineage and the parent's risk
class, uploads its trainable form, optionally starts a canary rollout, and reports the outcome to
`POST /api/v1/federated/runs/{id}/candidate`. Progress goes to stderr, one line per step. Exit 0 after
reporting success, 1 after reporting a failure, 2 when even the report could not be made.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cloud.client import ApiClient, ApiError
from compression.errors import CompressionError
from compression.pipeline import TRAINABLE_FILE
from compression.trainable import input_shape
from federated.build import CandidateBuild, build_candidate, parent_accuracy
from federated.lineage import (
    canary_plan,
    candidate_card,
    candidate_version,
    choose_eval,
    federated_record,
    run_label,
    variants_to_build,
)

__all__ = ["CandidateClient", "Outcome", "accuracy_gate", "build_and_push", "main"]

FINAL_FILE = "final.npz"
SUMMARY_FILE = "summary.json"
EXIT_REPORTED_FAILURE = 1
EXIT_UNREPORTED = 2


class CandidateClient(Protocol):
    """The part of `cloud.client.ApiClient` the candidate builder uses."""

    def federated_run(self, run_id: int) -> dict[str, Any]: ...
    def report_federated_candidate(self, run_id: int, body: dict[str, Any]) -> dict[str, Any]: ...
    def model(self, name: str) -> dict[str, Any]: ...
    def model_version(self, name: str, version: str) -> dict[str, Any]: ...
    def model_card(self, name: str, version: str) -> dict[str, Any]: ...
    def set_model_card(self, name: str, version: str, card: dict[str, Any]) -> dict[str, Any]: ...
    def trainable(self, name: str, version: str) -> bytes: ...
    def push_trainable(self, name: str, version: str, path: Path) -> dict[str, Any]: ...
    def push_variants(
        self, directory: Path, *, name: str, version: str, risk_class: str | None = None
    ) -> dict[str, Any]: ...
    def create_rollout(self, plan: dict[str, Any]) -> dict[str, Any]: ...
    def rollouts(self) -> list[dict[str, Any]]: ...


class CandidateError(Exception):
    """The candidate could not be built or registered; the message is what the run's error shows."""


@dataclass(frozen=True)
class Outcome:
    """What the builder reports: the version pushed, the rollout started, or why it stopped."""

    candidate_version: str | None
    rollout_id: int | None = None
    error: str | None = None

    def report(self) -> dict[str, Any]:
        """The body of `POST /federated/runs/{id}/candidate`."""
        return {"candidate_version": self.candidate_version, "rollout_id": self.rollout_id, "error": self.error}


def build_and_push(
    client: CandidateClient,
    run_id: int,
    *,
    work_dir: Path,
    result_dir: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
    latency_iterations: int = 300,
    measure_memory: bool = True,
) -> Outcome:
    """Build the candidate of run `run_id` and register it; the outcome (an error after the push is reported too)."""
    run = client.federated_run(run_id)
    model, parent = str(run["model_name"]), str(run["parent_version"])
    params = run.get("params", {})
    existing = _pushed_before(client, model, run_id)
    if existing is not None:  # a builder started again after a coordinator restart: the version is there
        progress(f"{model}:{existing} was registered for run {run_id} already")
        return _roll_out(client, run, existing, progress)
    result_dir = result_dir or _result_dir(run)
    summary = _summary(result_dir)
    progress(f"run {run_id}: {model}:{parent}, {summary.get('rounds')} rounds on {len(summary.get('nodes', []))} nodes")
    parent_body = client.model_version(model, parent)
    input_name, output_name = _tensor_names(parent_body)
    parent_card = _card(client, model, parent)
    risk = str((parent_card or {}).get("risk_class") or parent_body.get("risk_class") or "low")

    progress(f"fetching the trainable form of {model}:{parent}")
    parent_trainable = work_dir / "parent.trainable.pt2"
    parent_trainable.parent.mkdir(parents=True, exist_ok=True)
    parent_trainable.write_bytes(client.trainable(model, parent))
    choice = choose_eval(run.get("params", {}), input_shape(parent_trainable))
    progress(choice.note)
    build = build_candidate(
        parent_trainable=parent_trainable,
        final_npz=result_dir / FINAL_FILE,
        input_name=input_name,
        output_name=output_name,
        variants=variants_to_build(parent_body),
        evaluation=choice.evaluation,
        calibration=choice.calibration,
        out_dir=work_dir / "variants",
        work_dir=work_dir / "source",
        max_drop_pp=_max_drop(parent_body),
        latency_iterations=latency_iterations,
        measure_memory=measure_memory,
        progress=progress,
    )
    for verdict in build.result.refused:
        progress(f"refused {verdict.name}: {verdict.reason}")
    for skipped in build.result.skipped:
        progress(f"skipped {skipped.name}: {skipped.reason}")

    metrics = _card_metrics(build, parent_trainable, summary)
    version = candidate_version(parent, run_id, {str(v["version"]) for v in client.model(model).get("versions", [])})
    card = candidate_card(
        model=model,
        parent_version=parent,
        run_id=run_id,
        parent_card=parent_card,
        federated=federated_record(run, summary),
        metrics=metrics,
        risk_class=risk,
        owner=run.get("created_by"),
    )
    progress(f"pushing {model}:{version} ({risk} risk) with {len(build.result.variants)} variants")
    client.push_variants(build.out_dir, name=model, version=version, risk_class=risk)
    try:
        client.push_trainable(model, version, build.out_dir / TRAINABLE_FILE)
        client.set_model_card(model, version, card)
    except ApiError as exc:
        return Outcome(version, error=f"pushed {model}:{version}, but storing its trainable form or card failed: {exc}")
    progress(f"candidate {model}:{version} registered")
    refusal = accuracy_gate(metrics, float(params.get("max_accuracy_drop", 0.05)))
    if refusal is not None:
        progress(refusal)
        return Outcome(version, error=f"{model}:{version} {refusal}; not rolled out: {model}:{parent} keeps serving")
    return _roll_out(client, run, version, progress)


def accuracy_gate(metrics: dict[str, float], max_drop: float) -> str | None:
    """Why the candidate may not be rolled out (its accuracy on the evaluation data fell more than `max_drop` below
    the parent's), or None. Without both accuracies (no labelled evaluation data) there is nothing to gate on. Pure.
    """
    after, before = metrics.get("accuracy"), metrics.get("parent_accuracy")
    if after is None or before is None or after >= before - max_drop:
        return None
    return (
        f"failed the accuracy gate: {after:.3f} on the evaluation data against the parent's {before:.3f} "
        f"(a drop of {before - after:.3f}, at most {max_drop:.3f} allowed)"
    )


def _pushed_before(client: CandidateClient, model: str, run_id: int) -> str | None:
    """The version an earlier builder of this run registered (its lineage names the run), if any."""
    for version in client.model(model).get("versions", []):
        if (version.get("lineage") or {}).get("run") == run_label(run_id):
            return str(version["version"])
    return None


def _roll_out(client: CandidateClient, run: dict[str, Any], version: str, progress: Callable[[str], None]) -> Outcome:
    """Start the canary rollout the run asked for (once: a rollout of `version` that exists is reported)."""
    model, parent, params = str(run["model_name"]), str(run["parent_version"]), run.get("params", {})
    if params.get("rollout") != "canary":
        return Outcome(version)
    if str(client.model_version(model, version).get("risk_class") or "low") == "high":
        progress(f"no canary rollout: {model}:{version} is high risk and waits for its approvers' signatures")
        return Outcome(version)
    for rollout in client.rollouts():
        if rollout.get("model_name") == model and rollout.get("model_version") == version:
            return Outcome(version, int(rollout["id"]))
    plan = canary_plan(
        model=model,
        version=version,
        parent_version=parent,
        selector=run.get("selector", {}),
        overrides=params.get("rollout_plan"),
    )
    try:
        rollout_id = int(client.create_rollout(plan)["id"])
    except ApiError as exc:
        return Outcome(version, error=f"pushed {model}:{version}, but its canary rollout was refused: {exc}")
    progress(f"canary rollout {rollout_id} of {model}:{version} against {parent}")
    return Outcome(version, rollout_id)


def _result_dir(run: dict[str, Any]) -> Path:
    found = run.get("params", {}).get("result_dir") or run.get("result_dir")
    if not found:
        raise CandidateError("the run names no result directory (params.result_dir); pass --result-dir")
    return Path(str(found))


def _summary(result_dir: Path) -> dict[str, Any]:
    if not (result_dir / FINAL_FILE).is_file():
        raise CandidateError(f"the run left no {FINAL_FILE} in {result_dir}: did the Flower run complete?")
    try:
        return dict(json.loads((result_dir / SUMMARY_FILE).read_text()))
    except (OSError, ValueError) as exc:
        raise CandidateError(f"the run's {SUMMARY_FILE} in {result_dir} cannot be read: {exc}") from exc


def _tensor_names(parent: dict[str, Any]) -> tuple[str, str]:
    inputs, outputs = parent.get("inputs") or [], parent.get("outputs") or []
    if len(inputs) != 1 or len(outputs) != 1:
        raise CandidateError(
            f"the parent has {len(inputs)} inputs and {len(outputs)} outputs; federated candidates are built for "
            "models with one input and one output"
        )
    return str(inputs[0]["name"]), str(outputs[0]["name"])


def _card(client: CandidateClient, model: str, version: str) -> dict[str, Any] | None:
    try:
        return dict(client.model_card(model, version).get("card") or {})
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise


def _max_drop(parent: dict[str, Any]) -> float:
    """The parent's own gate (its compression report's max_drop_pp), else the default 1 point."""
    report = parent.get("compression_report") or {}
    value = report.get("max_drop_pp") if isinstance(report, dict) else None
    return float(value) if isinstance(value, int | float) else 1.0


def _card_metrics(build: CandidateBuild, parent_trainable: Path, summary: dict[str, Any]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    baseline = build.result.report.baseline
    if baseline.accuracy is not None and build.evaluation.name != "synthetic":
        metrics["accuracy"] = float(baseline.accuracy)
        before = parent_accuracy(parent_trainable, build.evaluation)
        if before is not None:
            metrics["parent_accuracy"] = before
    evaluations = summary.get("evaluate", {})
    if evaluations:
        last = evaluations[max(evaluations, key=int)]
        for key in ("eval_acc", "eval_loss"):
            if isinstance(last.get(key), int | float):
                metrics[f"federated_{key}"] = float(last[key])
    return metrics


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CandidateError | CompressionError | ApiError | ValueError | OSError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def main(argv: Sequence[str] | None = None, client: CandidateClient | None = None) -> int:
    """Build and register the candidate of a run, and report the outcome; the exit status (see the module doc)."""
    parser = argparse.ArgumentParser(prog="python -m federated.candidate", description=__doc__.splitlines()[0])
    parser.add_argument("run_id", type=int, help="the federated run (its Flower run completed)")
    parser.add_argument("--result-dir", type=Path, help="the run's result directory (default: from the run)")
    parser.add_argument("--work-dir", type=Path, help="where to build (default: a temporary directory)")
    args = parser.parse_args(argv)

    def progress(line: str) -> None:
        print(f"candidate of run {args.run_id}: {line}", file=sys.stderr, flush=True)

    if client is None:
        url = os.environ.get("EDGEFLEET_URL")
        if not url:
            progress("EDGEFLEET_URL is not set: the coordinator starts this builder with its URL and a token")
            return EXIT_UNREPORTED
        client = ApiClient(url=url, token=os.environ.get("EDGEFLEET_TOKEN"), timeout=300)
    with tempfile.TemporaryDirectory(prefix=f"fl-candidate-{args.run_id}-") as scratch:
        try:
            outcome = build_and_push(
                client,
                args.run_id,
                work_dir=args.work_dir or Path(scratch),
                result_dir=args.result_dir,
                progress=progress,
            )
        except Exception as exc:  # every failure is reported: the run must not stay `building`
            outcome = Outcome(None, error=_describe(exc))
    if outcome.error:
        progress(f"failed: {outcome.error}")
    try:
        client.report_federated_candidate(args.run_id, outcome.report())
    except ApiError as exc:
        progress(f"could not report the outcome to the coordinator: {exc}")
        return EXIT_UNREPORTED
    return EXIT_REPORTED_FAILURE if outcome.error else 0


if __name__ == "__main__":
    sys.exit(main())
