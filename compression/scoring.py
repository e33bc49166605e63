"""What a variant scored and whether it may ship: pure functions over predictions, no runtime.

| task           | data        | scores                                      | gated on (`max_drop`)                   |
|----------------|-------------|---------------------------------------------|-----------------------------------------|
| classification | labels      | accuracy, agreement with fp32               | accuracy points below fp32              |
| classification | inputs only | agreement with fp32                         | points of samples classed unlike fp32   |
| regression     | targets     | MAE, RMSE, deviation from fp32              | % by which RMSE exceeds fp32's RMSE     |
| regression     | inputs only | deviation from fp32                         | deviation, % of fp32's output spread    |

With labels or targets a variant is judged on the task, as fp32 is; without them, on how far it strays
from fp32. The deviation is the RMSE between the variant's and fp32's outputs as a percentage of the
standard deviation of fp32's outputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from compression.errors import InvalidInputError
from compression.outputs import EvaluatedOutput, OutputKind

__all__ = [
    "CompressionReport",
    "GateVerdict",
    "Measurement",
    "Scores",
    "class_ids",
    "gate",
    "score",
]


@dataclass(frozen=True)
class Scores:
    """How close a model came: to the labels or targets (when the data has them) and to fp32."""

    accuracy: float | None = None  # classifiers with labels: share of correct classes
    agreement: float | None = None  # classifiers: share of samples given the same class as by fp32
    mae: float | None = None  # regressors with targets: mean absolute error
    rmse: float | None = None  # regressors with targets: root mean squared error
    deviation_pct: float | None = None  # regressors: RMSE against fp32's outputs, % of their standard deviation


@dataclass(frozen=True)
class Measurement:
    """What one variant achieved on this CPU."""

    name: str
    size_bytes: int
    accuracy: float | None
    agreement: float | None  # fraction of eval samples where the variant predicts the same class as fp32
    latency_p50_ms: float
    latency_p99_ms: float
    latency_samples: int
    peak_rss_bytes: int | None  # None if not measured; else peak RSS of a fresh process running the model
    model_rss_bytes: int | None  # that peak minus the same process's RSS before loading (runtime already imported)
    mae: float | None = None
    rmse: float | None = None
    deviation_pct: float | None = None


@dataclass(frozen=True)
class GateVerdict:
    """Whether a variant may ship: how far it fell behind fp32 (`drop_pp`, in the unit of `metric`)."""

    name: str
    accepted: bool
    drop_pp: float
    reason: str
    # "accuracy" (pp), "agreement" (pp of samples), "rmse" (% above fp32's) or "deviation" (% of output spread)
    metric: str = "accuracy"


@dataclass(frozen=True)
class CompressionReport:
    """The fp32 baseline and every variant measured on one CPU, with that CPU's ISA flags."""

    baseline: Measurement
    variants: tuple[Measurement, ...]
    cpu_model: str = ""
    isa_flags: tuple[str, ...] = ()


def class_ids(output: np.ndarray, kind: OutputKind) -> np.ndarray:
    """Predicted class ids from an output read as `kind` (argmax of scores, or the labels themselves)."""
    if kind is OutputKind.SCORES:
        return np.asarray(output).reshape(len(output), -1).argmax(axis=1)
    return np.asarray(output).reshape(len(output)).astype(np.int64)


def score(target: EvaluatedOutput, predicted: np.ndarray, reference: np.ndarray, y: np.ndarray | None) -> Scores:
    """Scores of `predicted` (class ids or values, as `predictions` returns them) against fp32's and the labels."""
    if target.task == "classification":
        labels = None if y is None else _class_labels(y)
        return Scores(
            accuracy=None if labels is None else float((predicted == labels).mean()),
            agreement=float((predicted == reference).mean()),
        )
    values, fp32 = _as_rows(predicted), _as_rows(reference)
    spread = float(np.std(fp32)) or float(np.mean(np.abs(fp32))) or 1.0  # a constant output: its magnitude
    deviation = float(np.sqrt(np.mean((values - fp32) ** 2))) / spread * 100.0
    if y is None:
        return Scores(deviation_pct=deviation)
    targets = _as_rows(np.asarray(y, dtype=np.float64))
    if targets.shape != values.shape:
        raise InvalidInputError(
            f"the targets y have {targets.shape[1]} value(s) per sample, output {target.name!r} has {values.shape[1]}"
        )
    error = values - targets
    return Scores(mae=float(np.mean(np.abs(error))), rmse=float(np.sqrt(np.mean(error**2))), deviation_pct=deviation)


def _as_rows(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(len(values), -1)


def _class_labels(y: np.ndarray) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer):
        raise InvalidInputError(
            "the labels y are not whole numbers, so they are not class ids; for a regressor pass --task regression"
        )
    return y.reshape(len(y))


def gate(report: CompressionReport, max_drop_pp: float = 1.0) -> list[GateVerdict]:
    """Accept each variant at most `max_drop_pp` behind fp32 (see the module table for what is measured)."""
    return [_verdict(report.baseline, m, max_drop_pp) for m in report.variants]


def _verdict(base: Measurement, m: Measurement, limit: float) -> GateVerdict:
    if m.rmse is not None and base.rmse is not None:
        excess = (m.rmse - base.rmse) / base.rmse * 100.0 if base.rmse > 0 else (0.0 if m.rmse == 0 else math.inf)
        drop = round(excess, 6)
        said = f"RMSE {m.rmse:.4g} is {drop:.2f} % above fp32's ({base.rmse:.4g})"
        return _decide(m.name, drop, limit, "rmse", said, "%")
    if m.deviation_pct is not None:
        drop = round(m.deviation_pct, 6)
        said = f"outputs deviate from fp32 by {drop:.2f} % of their spread (RMSE / std)"
        return _decide(m.name, drop, limit, "deviation", said, "%")
    if base.accuracy is not None and m.accuracy is not None:
        drop = round((base.accuracy - m.accuracy) * 100.0, 6)
        said = f"accuracy {m.accuracy:.2%} is {drop:.2f} pp below fp32 ({base.accuracy:.2%})"
        return _decide(m.name, drop, limit, "accuracy", said, "pp")
    drop = round((1.0 - (m.agreement if m.agreement is not None else 0.0)) * 100.0, 6)
    said = f"{drop:.2f} % of the samples get another class than from fp32 (no labels: judged by agreement)"
    return _decide(m.name, drop, limit, "agreement", said, "pp")


def _decide(name: str, drop: float, limit: float, metric: str, said: str, unit: str) -> GateVerdict:
    if drop > limit:
        return GateVerdict(name, False, drop, f"{said}, more than the allowed {limit:g} {unit}", metric)
    return GateVerdict(name, True, drop, f"within {limit:g} {unit} of fp32 ({metric})", metric)
