"""What a model's outputs mean (class ids, class scores, regression values) and the predictions read from them.

`infer_output_semantics` decides from the declared tensors alone (pure), with the same shape rules as
`compression.outputs.choose_output`, so `edgefleet compress` and the device read a model alike:

| outputs declared                                        | semantics                                             |
|---------------------------------------------------------|-------------------------------------------------------|
| integer `[n]`/`[n, 1]` + float `[n, C]` (skl2onnx, `zipmap=False`) | classifier: `label_output` + `scores_output`  |
| one float `[n, C]`, C != 1 (the reference MLP's probabilities, the CNN's logits) | classifier: `scores_output` |
| one integer `[n]`/`[n, 1]`                              | classifier: `label_output` (counts, no confidence)    |
| one float `[n]`/`[n, 1]` and nothing above              | regressor: `value_output`                             |
| anything else (several candidates, no tensors)          | unknown: inferences are counted, nothing is read      |

Scores are probabilities or logits. A name says which when it can (`prob`/`softmax` → probabilities, `logit`
→ logits); otherwise `predictions` decides per call from the values: when every row is non-negative and sums to
1 ± 1e-3 the scores are read as probabilities, else as logits (and a softmax makes them probabilities). A
coordinator that knows better declares it in `ModelSpec.output_semantics`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.errors import ProtocolError

if TYPE_CHECKING:  # messages imports this module (ModelSpec.output_semantics): the type is read only
    from protocol.messages import TensorSpec

__all__ = [
    "PROBABILITY_TOLERANCE",
    "OutputSemantics",
    "OutputsError",
    "Predictions",
    "infer_output_semantics",
    "predictions",
]

# How far a row of scores may sum from 1 and still be read as probabilities.
PROBABILITY_TOLERANCE = 1e-3
_FLOATS = {"FP16", "FP32", "FP64"}
_INTEGERS = {"INT8", "UINT8", "INT16", "INT32", "INT64"}

OutputKind = Literal["classifier", "regressor", "unknown"]
ScoresKind = Literal["probabilities", "logits"]


class OutputsError(ProtocolError, ValueError):
    """A model's outputs do not fit the semantics they are read with (the model or its declaration is at fault)."""


class OutputSemantics(BaseModel):
    """How a model's outputs read: which output holds class ids, class scores or regression values."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    kind: OutputKind
    label_output: str | None = Field(default=None, max_length=256)  # integer class ids, [n] or [n, 1]
    scores_output: str | None = Field(default=None, max_length=256)  # float [n, classes]
    scores: ScoresKind | None = None  # how scores_output reads; None: decided per window from the values
    value_output: str | None = Field(default=None, max_length=256)  # a regressor's float [n] / [n, 1]
    classes: list[str] | None = Field(default=None, max_length=65536)  # class names by index, when declared

    @model_validator(mode="after")
    def _consistent(self) -> OutputSemantics:
        if self.kind == "classifier" and self.label_output is None and self.scores_output is None:
            raise ValueError("a classifier needs label_output or scores_output")
        if self.kind == "regressor" and self.value_output is None:
            raise ValueError("a regressor needs value_output")
        if self.scores is not None and self.scores_output is None:
            raise ValueError("scores describes scores_output, which is not set")
        return self

    def missing_from(self, outputs: Sequence[TensorSpec]) -> list[str]:
        """The outputs these semantics name that `outputs` lacks (a variant that renamed its tensors lacks them)."""
        names = {spec.name for spec in outputs}
        named = (self.label_output, self.scores_output, self.value_output)
        return [n for n in named if n is not None and n not in names]


@dataclass(frozen=True)
class Predictions:
    """What one batch predicted: class ids, top-1 probability and top1 - top2 margin per row, or values."""

    classes: np.ndarray | None = None  # int64 [n]
    top1: np.ndarray | None = None  # float64 [n], in 0..1
    margin: np.ndarray | None = None  # float64 [n], in 0..1
    values: np.ndarray | None = None  # float64 [n] (a regressor's outputs, flattened)


def _is_labels(spec: TensorSpec) -> bool:
    shape = spec.shape
    return spec.datatype in _INTEGERS and (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1))


def _is_scores(spec: TensorSpec) -> bool:
    return spec.datatype in _FLOATS and len(spec.shape) == 2 and spec.shape[1] != 1


def _is_values(spec: TensorSpec) -> bool:
    shape = spec.shape
    return spec.datatype in _FLOATS and (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1))


def _scores_by_name(name: str) -> ScoresKind | None:
    lowered = name.lower()
    if "logit" in lowered:
        return "logits"
    if "prob" in lowered or "softmax" in lowered:
        return "probabilities"
    return None


def infer_output_semantics(outputs: Sequence[TensorSpec]) -> OutputSemantics:
    """The semantics of a model's declared outputs (table in the module docstring); "unknown" when ambiguous."""
    scores = [s for s in outputs if _is_scores(s)]
    labels = [s for s in outputs if _is_labels(s)]
    if len(scores) > 1 or len(labels) > 1:
        return OutputSemantics(kind="unknown")
    if scores or labels:
        score = scores[0].name if scores else None
        return OutputSemantics(
            kind="classifier",
            label_output=labels[0].name if labels else None,
            scores_output=score,
            scores=_scores_by_name(score) if score is not None else None,
        )
    values = [s for s in outputs if _is_values(s)]
    if len(values) == 1:
        return OutputSemantics(kind="regressor", value_output=values[0].name)
    return OutputSemantics(kind="unknown")


def _output(outputs: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    try:
        return np.asarray(outputs[name])
    except KeyError:
        raise OutputsError(f"the model returned no output {name!r} (it returned {sorted(outputs)})") from None


def _as_probabilities(scores: np.ndarray, declared: ScoresKind | None) -> np.ndarray:
    """Rows of probabilities: as they are when they read so (declared, or undeclared and each row a distribution)."""
    x = scores.astype(np.float64, copy=False)
    if declared == "probabilities":
        return x
    if declared is None and bool(np.all(x >= 0)) and bool(np.all(np.abs(x.sum(axis=1) - 1.0) <= PROBABILITY_TOLERANCE)):
        return x
    shifted = np.exp(x - x.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _classifier(semantics: OutputSemantics, outputs: Mapping[str, np.ndarray]) -> Predictions:
    classes = top1 = margin = None
    if semantics.scores_output is not None:
        scores = _output(outputs, semantics.scores_output)
        if scores.ndim != 2 or scores.shape[1] < 2 or not np.issubdtype(scores.dtype, np.number):
            raise OutputsError(f"output {semantics.scores_output!r} is {scores.dtype} {list(scores.shape)}, not scores")
        probabilities = _as_probabilities(scores, semantics.scores)
        top2 = np.partition(probabilities, -2, axis=1)[:, -2:]
        top1, margin = top2[:, 1], top2[:, 1] - top2[:, 0]
        classes = np.argmax(scores, axis=1).astype(np.int64)
    if semantics.label_output is not None:
        labels = _output(outputs, semantics.label_output)
        if not np.issubdtype(labels.dtype, np.integer) or labels.ndim not in (1, 2) or labels.size != len(labels):
            raise OutputsError(
                f"output {semantics.label_output!r} is {labels.dtype} {list(labels.shape)}, not class ids"
            )
        classes = labels.reshape(-1).astype(np.int64, copy=False)
        if top1 is not None and len(top1) != len(classes):
            raise OutputsError(f"{len(classes)} class ids but {len(top1)} rows of scores")
    return Predictions(classes=classes, top1=top1, margin=margin)


def predictions(semantics: OutputSemantics, outputs: Mapping[str, np.ndarray]) -> Predictions:
    """Read one batch's outputs with `semantics`; `OutputsError` when they do not fit it."""
    if semantics.kind == "classifier":
        return _classifier(semantics, outputs)
    if semantics.kind == "regressor" and semantics.value_output is not None:
        values = _output(outputs, semantics.value_output)
        if not np.issubdtype(values.dtype, np.number) or values.ndim == 0 or values.size != len(values):
            raise OutputsError(f"output {semantics.value_output!r} is {values.dtype} {list(values.shape)}, not values")
        return Predictions(values=values.reshape(-1).astype(np.float64, copy=False))
    return Predictions()
