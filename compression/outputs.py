"""Which output of a model `edgefleet compress` evaluates, and as what: class scores, class ids or values.

`choose_output` is a pure decision over the declared tensors. `read_model_tensors` reads them from an ONNX
file and refuses, with the fix, what devices cannot serve: outputs that are not tensors (scikit-learn's
default `ZipMap`, a sequence of maps) and models with other than one FP32 input.

| output declared                     | read as  | task            | compared by                           |
|-------------------------------------|----------|-----------------|---------------------------------------|
| float `[n, classes]`                | `scores` | classification  | argmax = class id                     |
| integer `[n]` or `[n, 1]` (`label`) | `labels` | classification  | the class ids themselves              |
| float `[n]`, `[n, 1]`, or any shape with `--task regression` | `values` | regression | error against fp32 |
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from compression.errors import InvalidInputError
from compression.specs import tensor_specs
from protocol.messages import Datatype, TensorSpec

__all__ = ["TASKS", "EvaluatedOutput", "OutputKind", "choose_output", "read_model_tensors"]

TASKS = ("auto", "classification", "regression")
_FLOATS = {Datatype.FP16, Datatype.FP32, Datatype.FP64}
_INTEGERS = {Datatype.INT8, Datatype.UINT8, Datatype.INT16, Datatype.INT32, Datatype.INT64}


class OutputKind(StrEnum):
    """How an output's values are read."""

    SCORES = "scores"  # one score per class (probabilities or logits): the class is the argmax
    LABELS = "labels"  # the class ids themselves
    VALUES = "values"  # a regressor's predictions


@dataclass(frozen=True)
class EvaluatedOutput:
    """The output a run evaluates and how its values are read."""

    name: str
    kind: OutputKind

    @property
    def task(self) -> str:
        """`classification` or `regression`."""
        return "regression" if self.kind is OutputKind.VALUES else "classification"


def _is_labels(spec: TensorSpec) -> bool:
    return spec.datatype in _INTEGERS and (len(spec.shape) == 1 or (len(spec.shape) == 2 and spec.shape[1] == 1))


def _is_scores(spec: TensorSpec) -> bool:
    return spec.datatype in _FLOATS and len(spec.shape) == 2 and spec.shape[1] != 1


def _is_values(spec: TensorSpec) -> bool:
    return spec.datatype in _FLOATS and (len(spec.shape) == 1 or (len(spec.shape) == 2 and spec.shape[1] == 1))


def _kind_of(spec: TensorSpec, task: str) -> OutputKind:
    """How the output the user named is read, or `InvalidInputError` saying why it cannot be evaluated."""
    if task == "regression":
        if spec.datatype in _FLOATS | _INTEGERS:
            return OutputKind.VALUES
    elif _is_labels(spec):
        return OutputKind.LABELS
    elif _is_scores(spec):
        return OutputKind.SCORES
    elif task == "auto" and _is_values(spec):
        return OutputKind.VALUES
    raise InvalidInputError(
        f"output {spec.name!r} ({spec.datatype.value} {spec.shape}) cannot be evaluated as "
        f"{'a ' + task if task != 'auto' else 'class scores [n, classes], class ids [n] or values [n]'}"
        f"{'' if task == 'regression' else ' (--task regression compares any numeric output with fp32)'}"
    )


def choose_output(
    outputs: Sequence[TensorSpec], *, requested: str | None = None, task: str = "auto"
) -> EvaluatedOutput:
    """The output to evaluate: `requested` if given, else the only class-score output, else the only fitting one."""
    if task not in TASKS:
        raise InvalidInputError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    names = [spec.name for spec in outputs]
    if requested is not None:
        spec = next((s for s in outputs if s.name == requested), None)
        if spec is None:
            raise InvalidInputError(f"--output {requested!r}: the model has no such output (it has {names})")
        return EvaluatedOutput(spec.name, _kind_of(spec, task))
    if task == "regression":
        tiers = [[s for s in outputs if s.datatype in _FLOATS]]
    else:
        tiers = [[s for s in outputs if _is_scores(s)], [s for s in outputs if _is_labels(s)]]
        if task == "auto":
            tiers.append([s for s in outputs if _is_values(s)])
    for candidates in tiers:
        if len(candidates) == 1:
            return EvaluatedOutput(candidates[0].name, _kind_of(candidates[0], task))
        if len(candidates) > 1:
            raise InvalidInputError(
                f"the model has several outputs that could be evaluated ({[s.name for s in candidates]}); "
                "choose one with --output NAME"
            )
    wanted = {"regression": "a float output", "classification": "class scores [n, classes] or class ids [n]"}
    raise InvalidInputError(
        f"none of the model's outputs {[f'{s.name} {s.datatype.value} {s.shape}' for s in outputs]} looks like "
        f"{wanted.get(task, 'class scores, class ids or regression values')}; choose one with --output NAME"
        + ("" if task == "regression" else " (and --task regression to compare any numeric output with fp32)")
    )


def read_model_tensors(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """`(inputs, outputs)` of an ONNX model that compress can evaluate: one FP32 input, tensor outputs only."""
    _refuse_non_tensor_outputs(path)
    inputs, outputs = tensor_specs(path)
    if len(inputs) != 1:
        raise InvalidInputError(
            f"{path.name}: compress evaluates models with one input; this one takes {[s.name for s in inputs]}"
        )
    if inputs[0].datatype is not Datatype.FP32:
        raise InvalidInputError(
            f"{path.name}: input {inputs[0].name!r} is {inputs[0].datatype.value}; compress feeds FP32 inputs "
            "(convert the model with a float32 input, e.g. skl2onnx's to_onnx(model, X.astype(numpy.float32)))"
        )
    return inputs, outputs


def _refuse_non_tensor_outputs(path: Path) -> None:
    import onnx

    try:
        graph = onnx.load_model(str(path), load_external_data=False).graph
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError or ValueError depending on the damage
        raise InvalidInputError(f"{path.name}: not a valid ONNX model ({exc})") from exc
    producers = {output: node.op_type for node in graph.node for output in node.output}
    for value in graph.output:
        if value.type.HasField("tensor_type"):
            continue
        if producers.get(value.name) == "ZipMap":
            raise InvalidInputError(
                f"{path.name}: output {value.name!r} is a list of dictionaries (scikit-learn's ZipMap), which devices "
                "cannot serve; convert with skl2onnx's options={id(model): {'zipmap': False}} to get a "
                "probabilities tensor"
            )
        raise InvalidInputError(
            f"{path.name}: output {value.name!r} is a {value.type.WhichOneof('value') or 'untyped value'}, "
            "not a tensor; devices serve tensors only"
        )
