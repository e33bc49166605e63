"""Labels fed back for earlier predictions: what the agent remembers of them, and what each label counts.

An inference request with an Open Inference Protocol `id` (or one the endpoint gave it: sampled models) leaves
its prediction here: the predicted class per row for a classifier (read as telemetry reads class counts:
`agent.windows.read_predictions`), the predicted value per row for a regressor. At most `max_ids` predictions
(default 10,000) are remembered, each for at most `max_age_s` (default 1 hour); beyond either the oldest is
forgotten first, and a label for it is then "unknown" (404). Ids longer than `MAX_ID_LENGTH` (256) and requests of
more than `MAX_ROWS` (1,024) rows are not remembered. A prediction that got its label stays remembered
(marked) until forgotten, so a second label for it is refused (409): a label counts once. A new request with an id
already remembered replaces the earlier prediction.

A label counts in the telemetry window in which it arrives (`TelemetryRecorder.add_labels`): `labelled`,
`correct` and `by_class` for classifiers, `abs_error_sum` for regressors. A label of a prediction whose model
version no longer serves is taken (and marks the prediction) but dropped from the counts: it is answered as
`stale` and counted in the metric `edgefleet_agent_labels_refused_total{reason="stale_version"}`.

The body (`parse_feedback`, pure): one item `{"id": ..., "label": L}` for a request of one row, or
`{"id": ..., "labels": [L, ...]}` with one label per row of the request, or a JSON list of such items. `L` is a
class index (int), a class name (string, when the model declares class names) or a number (regressors). A body is
taken whole or not at all: when any item is refused, nothing is counted and the error lists every refused item.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.errors import (
    AlreadyLabelledError,
    FeedbackBodyError,
    FeedbackError,
    LabelMismatchError,
    UnknownRequestError,
)
from agent.serving import ActiveModel
from agent.windows import LabelTally, read_predictions
from protocol import ModelRef

__all__ = [
    "DEFAULT_MAX_AGE_S",
    "DEFAULT_MAX_IDS",
    "MAX_ID_LENGTH",
    "MAX_ROWS",
    "Feedback",
    "FeedbackItem",
    "FeedbackResult",
    "Prediction",
    "PredictionLog",
    "parse_feedback",
    "score",
]

DEFAULT_MAX_IDS = 10_000
DEFAULT_MAX_AGE_S = 3600.0
MAX_ID_LENGTH = 256  # longer ids are not remembered (a bound on memory per prediction)
MAX_ROWS = 1024  # requests of more rows are not remembered (with the id bound: at most ~10M rows in memory)

Label = int | float | str


@dataclass(frozen=True)
class FeedbackItem:
    """One body item: a request id and its labels, one per row of that request."""

    request_id: str
    labels: tuple[Label, ...]


@dataclass
class Prediction:
    """What the agent remembers of one request: the model, and classes or values per row."""

    model: ModelRef
    at: float
    classes: tuple[int, ...] | None = None
    values: tuple[float, ...] | None = None
    n_classes: int | None = None  # columns of the scores, when the model has them (bounds a class index)
    class_names: tuple[str, ...] | None = None  # declared in the spec's output semantics
    labelled: bool = False

    @property
    def rows(self) -> int:
        """Rows of the request's batch."""
        return len(self.classes if self.classes is not None else self.values or ())


@dataclass(frozen=True)
class FeedbackResult:
    """What a body counted: labels (rows), how many were right, a regressor's absolute errors, and the ids whose
    model version no longer serves (taken, not counted)."""

    labelled: int = 0
    correct: int = 0
    abs_error_sum: float = 0.0
    stale: list[str] = field(default_factory=list)
    items: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The 200 answer's body."""
        return {
            "labelled": self.labelled,
            "correct": self.correct,
            "abs_error_sum": self.abs_error_sum,
            "stale": self.stale,
            "items": self.items,
        }


# -- the body and the scoring (pure) -------------------------------------------------------------------------


def parse_feedback(body: Any) -> list[FeedbackItem]:
    """The items of a decoded feedback body (module docstring); `FeedbackBodyError` or `LabelMismatchError` (a
    label that is no class or number) naming every refused item."""
    items = body if isinstance(body, list) else [body]
    if not items:
        raise FeedbackBodyError('the body is an empty list: send {"id": ..., "label": ...} or a list of those')
    parsed: list[FeedbackItem] = []
    refused: list[tuple[int, str, str, str]] = []
    first: type[FeedbackError] | None = None
    for index, item in enumerate(items):
        try:
            parsed.append(_item(item, f"[{index}]" if isinstance(body, list) else "the body"))
        except FeedbackError as exc:
            given = item.get("id") if isinstance(item, dict) else None
            request_id = given if isinstance(given, str) else ""
            refused.append((index, request_id, exc.reason, str(exc)))
            first = first or type(exc)
    if first is not None:
        raise first(_summary(refused), refused=refused)
    return parsed


def _item(item: Any, where: str) -> FeedbackItem:
    if not isinstance(item, dict):
        raise FeedbackBodyError(f'{where} must be an object {{"id": ..., "label": ...}}, got {_kind(item)}')
    request_id = item.get("id")
    if not isinstance(request_id, str) or not request_id:
        raise FeedbackBodyError(f"{where}.id must be the inference request's id (a non-empty string)")
    if ("label" in item) == ("labels" in item):
        raise FeedbackBodyError(f'{where} needs "label" (a request of one row) or "labels" (one per row), not both')
    if "label" in item:
        if isinstance(item["label"], list):
            raise FeedbackBodyError(f'{where}.label is a list: send one label per row as "labels": [...]')
        labels = [item["label"]]
    else:
        labels = item["labels"]
        if not isinstance(labels, list) or not labels:
            raise FeedbackBodyError(f"{where}.labels must be a non-empty list with one label per row")
    for row, value in enumerate(labels):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise LabelMismatchError(f"{where} row {row}: a label is a class index, class name or number, "
                                     f"got {_kind(value)}")  # fmt: skip
        if isinstance(value, float) and not math.isfinite(value):
            raise LabelMismatchError(f"{where} row {row}: a label must be finite, got {value}")
    return FeedbackItem(request_id, tuple(labels))


def score(prediction: Prediction, labels: Sequence[Label]) -> LabelTally:
    """What `labels` (one per row) count against `prediction`; `LabelMismatchError` for the wrong kind or count."""
    if labels and len(labels) != prediction.rows:
        raise LabelMismatchError(f"the request had {prediction.rows} row(s) but {len(labels)} label(s) came; "
                                 "send one per row")  # fmt: skip
    tally = LabelTally(labelled=len(labels))
    if prediction.classes is not None:
        for row, (label, predicted) in enumerate(zip(labels, prediction.classes, strict=True)):
            cls = _class_index(prediction, label, row)
            right = int(cls == predicted)
            tally.correct += right
            pair = tally.by_class.setdefault(str(cls), [0, 0])
            pair[0] += 1
            pair[1] += right
        return tally
    if prediction.values is not None:
        for row, (label, value) in enumerate(zip(labels, prediction.values, strict=True)):
            if isinstance(label, str):
                raise LabelMismatchError(f"row {row}: the model predicts values; a label is a number, got {label!r}")
            tally.abs_error_sum += abs(float(label) - value)
        return tally
    raise LabelMismatchError(f"the outputs of {prediction.model.name} are neither classes nor values: "
                             "there is nothing to compare a label with")  # fmt: skip


def _class_index(prediction: Prediction, label: Label, row: int) -> int:
    if isinstance(label, str):
        names = prediction.class_names
        if not names:
            raise LabelMismatchError(f"row {row}: {prediction.model.name} declares no class names; "
                                     f"send the class index, not {label!r}")  # fmt: skip
        if label not in names:
            raise LabelMismatchError(f"row {row}: unknown class name {label!r}; the model's classes are {_kind(names)}")
        return names.index(label)
    if isinstance(label, float) and not label.is_integer():
        raise LabelMismatchError(f"row {row}: the model predicts classes; a label is a class index, got {label}")
    index = int(label)
    bound = prediction.n_classes or (len(prediction.class_names) if prediction.class_names else None)
    if index < 0 or (bound is not None and index >= bound):
        limit = f"0..{bound - 1}" if bound is not None else "0 or above"
        raise LabelMismatchError(f"row {row}: class index {index} is out of range ({limit})")
    return index


def _summary(refused: list[tuple[int, str, str, str]]) -> str:
    head = refused[0][3]
    more = f" (and {len(refused) - 1} more refused item(s); nothing was counted)" if len(refused) > 1 else ""
    return f"{head}{more}"


def _kind(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


# -- what the agent remembers ----------------------------------------------------------------------------------


class PredictionLog:
    """Predictions of recent requests by id, bounded by count and age (oldest forgotten first); thread-safe."""

    def __init__(
        self,
        *,
        max_ids: int = DEFAULT_MAX_IDS,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_ids < 1 or max_age_s <= 0:
            raise ValueError(f"max_ids and max_age_s must be positive, got {max_ids} and {max_age_s}")
        self.max_ids = max_ids
        self.max_age_s = max_age_s
        self._clock = clock
        self._entries: OrderedDict[str, Prediction] = OrderedDict()
        self.lock = threading.Lock()  # held by `Feedback` across a whole body: check all, then mark all
        self.forgotten = 0  # predictions dropped by the bounds before they got a label

    def now(self) -> float:
        """The log's clock."""
        return self._clock()

    def remember(self, request_id: str, prediction: Prediction) -> None:
        """Keep `prediction` under `request_id` (replacing an earlier one), forgetting the oldest beyond the bound."""
        if len(request_id) > MAX_ID_LENGTH or prediction.rows > MAX_ROWS:
            return
        with self.lock:
            self._entries.pop(request_id, None)
            self._entries[request_id] = prediction
            self._expire(prediction.at)
            while len(self._entries) > self.max_ids:
                self._forget_oldest()

    def get(self, request_id: str) -> Prediction | None:
        """The prediction of `request_id`, if still remembered (the caller holds `lock`)."""
        self._expire(self._clock())
        return self._entries.get(request_id)

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if now - oldest.at <= self.max_age_s:
                return
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        _, gone = self._entries.popitem(last=False)
        self.forgotten += not gone.labelled


def prediction_of(active: ActiveModel, outputs: Mapping[str, np.ndarray], at: float) -> Prediction:
    """What to remember of one request's `outputs` on `active` (`protocol.OutputsError` when they do not read)."""
    predicted = read_predictions(outputs, active.semantics)
    n_classes = None
    scores_name = active.semantics.scores_output
    if scores_name is not None and scores_name in outputs and np.ndim(outputs[scores_name]) == 2:
        n_classes = int(np.shape(outputs[scores_name])[1])
    elif active.semantics.kind == "unknown" and predicted.classes is not None:
        n_classes = int(np.shape(next(iter(outputs.values())))[1])
    names = active.semantics.classes
    return Prediction(
        model=active.ref,
        at=at,
        classes=tuple(int(c) for c in predicted.classes) if predicted.classes is not None else None,
        values=tuple(float(v) for v in predicted.values) if predicted.values is not None else None,
        n_classes=n_classes,
        class_names=tuple(names) if names else None,
    )


# -- the service -----------------------------------------------------------------------------------------------


class Feedback:
    """Remembers predictions and takes labels for them: counts into the open window, metrics, the sample store.

    `current` says which model serves now (a label of another version is stale); `add_labels` is the telemetry
    recorder's; `observe(model name, reason, n)` counts labels received (`reason` None) or refused (metrics);
    `forward(model name, items)` hands taken labels on (the sample store) and must not raise.
    """

    def __init__(
        self,
        log: PredictionLog,
        *,
        current: Callable[[], ActiveModel | None],
        add_labels: Callable[[ModelRef, LabelTally], None],
        observe: Callable[[str, str | None, int], None] | None = None,
        forward: Callable[[str, list[tuple[str, list[int | float]]]], None] | None = None,
    ) -> None:
        self.log = log
        self._current = current
        self._add_labels = add_labels
        self._observe = observe
        self._forward = forward

    def remember(self, request_id: str, active: ActiveModel, outputs: Mapping[str, np.ndarray]) -> None:
        """Remember the prediction of one served request; never fails the inference (unreadable outputs: skipped)."""
        try:
            prediction = prediction_of(active, outputs, self.log.now())
        except Exception:  # odd outputs: telemetry counts those (sketch_failures); the request just cannot be labelled
            return
        self.log.remember(request_id, prediction)

    def label(self, model_name: str, items: list[FeedbackItem], *, version: str | None = None) -> FeedbackResult:
        """Take the labels of `items` for `model_name` (and `version`, when the path names one): all or nothing."""
        current = self._current()
        scored: list[tuple[FeedbackItem, Prediction, LabelTally]] = []
        refused: list[tuple[int, str, str, str]] = []
        first: type[FeedbackError] | None = None
        with self.log.lock:
            seen: set[str] = set()
            for index, item in enumerate(items):
                try:
                    prediction = self._check(item, model_name, version, seen)
                    scored.append((item, prediction, score(prediction, item.labels)))
                except FeedbackError as exc:
                    refused.append((index, item.request_id, exc.reason, str(exc)))
                    first = first or type(exc)
                seen.add(item.request_id)
            if first is None:
                for _, prediction, _ in scored:
                    prediction.labelled = True
        if first is not None:
            for _, _, reason, _ in refused:
                self.observed(model_name, reason, 1)
            raise first(_summary(refused), refused=refused)
        return self._count(model_name, current, scored)

    def observed(self, model_name: str, reason: str | None, n: int) -> None:
        """Count `n` labels received (`reason` None) or refused for `reason` in the metrics (a path's model name
        other than the served one is `other`: the caller chooses it, and metric series must stay bounded)."""
        if self._observe is None:
            return
        current = self._current()
        self._observe(model_name if current is not None and current.spec.name == model_name else "other", reason, n)

    def _check(self, item: FeedbackItem, model_name: str, version: str | None, seen: set[str]) -> Prediction:
        prediction = self.log.get(item.request_id)
        if prediction is None or prediction.model.name != model_name:
            raise UnknownRequestError(
                f"no prediction of {model_name!r} with id {item.request_id!r} is remembered: never served with that "
                f"id, or forgotten (the agent keeps the last {self.log.max_ids} for {self.log.max_age_s:g} s)"
            )
        if version is not None and prediction.model.version != version:
            raise UnknownRequestError(f"request {item.request_id!r} was served by version "
                                      f"{prediction.model.version!r}, not {version!r}")  # fmt: skip
        if prediction.labelled or item.request_id in seen:
            raise AlreadyLabelledError(f"request {item.request_id!r} already has its label; a label counts once")
        return prediction

    def _count(
        self, model_name: str, current: ActiveModel | None, scored: list[tuple[FeedbackItem, Prediction, LabelTally]]
    ) -> FeedbackResult:
        labelled = correct = 0
        abs_error_sum = 0.0
        stale: list[str] = []
        answers: list[dict[str, Any]] = []
        forwarded: list[tuple[str, list[int | float]]] = []
        for item, prediction, tally in scored:
            live = current is not None and (current.spec.name, current.spec.version) == (
                prediction.model.name,
                prediction.model.version,
            )
            if not live:
                stale.append(item.request_id)
                self.observed(model_name, "stale_version", tally.labelled)
                continue
            self._add_labels(prediction.model, tally)
            self.observed(model_name, None, tally.labelled)
            labelled += tally.labelled
            correct += tally.correct
            abs_error_sum += tally.abs_error_sum
            answer: dict[str, Any] = {"id": item.request_id, "labelled": tally.labelled}
            if prediction.classes is not None:
                answer["correct"] = tally.correct
                forwarded.append((item.request_id, [int(c) for c, _ in _rows_by_class(prediction, item.labels)]))
            else:
                answer["abs_error"] = tally.abs_error_sum
                forwarded.append((item.request_id, [float(v) for v in item.labels]))
            answers.append(answer)
        if self._forward is not None and forwarded:
            self._forward(model_name, forwarded)
        return FeedbackResult(labelled, correct, abs_error_sum, stale, answers)


def _rows_by_class(prediction: Prediction, labels: Sequence[Label]) -> list[tuple[int, Label]]:
    """(class index, label as sent) per row; the labels were scored already, so they resolve."""
    return [(_class_index(prediction, label, row), label) for row, label in enumerate(labels)]
