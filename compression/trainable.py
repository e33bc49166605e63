"""The trainable form of a model version: a `torch.export` program with a dynamic batch axis (`.pt2`).

Federated retraining (docs/federated.md) starts from it: `torch.export.load(p).module()` is a module whose
parameters require grad, so an optimizer can train it, and whose `state_dict()` keys equal the original
module's, so weights travel as arrays by parameter name (`.npz`). Exported in eval mode: dropout and
batch-norm stay as exported (inference behaviour), and `.train()` on the loaded module raises — never call it.
After training, `export_onnx` gives the ONNX model the compression package turns into variants, with the
parent's tensor names and a dynamic batch axis.

torch is imported inside the functions, so importing this module never needs it.
"""

from __future__ import annotations

import contextlib
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compression.errors import ConverterUnavailableError, InvalidInputError

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_BATCH",
    "TRAINABLE_FORMAT",
    "check_state",
    "export_fixed_program",
    "export_onnx_from_trainable",
    "export_trainable",
    "input_shape",
    "load_state_npz",
    "load_trainable",
    "read_state_npz",
    "state_dict_npz",
]

TRAINABLE_FORMAT = "torch.export"  # what the registry records as the trainable form's `format`
MAX_BATCH = 4096


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ConverterUnavailableError("PyTorch is not installed: pip install 'edgefleet[convert]'") from exc
    return torch


def _batch_dim(torch: Any) -> Any:
    return torch.export.Dim("batch", min=1, max=MAX_BATCH)


def _traceable_example(torch: Any, example: torch.Tensor) -> torch.Tensor:
    """The example with a batch of at least 2: a batch of 1 would let the tracer specialise the axis to 1."""
    if example.shape[0] >= 2:
        return example
    return torch.cat([example, example]) if example.shape[0] == 1 else torch.zeros(2, *example.shape[1:])


def export_trainable(module: torch.nn.Module, example_input: torch.Tensor, path: Path) -> Path:
    """Save `module` (put in eval mode) as a `torch.export` program with a dynamic batch axis at `path`.

    `module` may itself come from `load_trainable` (a retrained candidate): it is exported again as it is.
    """
    torch = _torch()
    with contextlib.suppress(NotImplementedError):  # a loaded program's module: fixed as exported, in eval mode
        module.eval()
    example = _traceable_example(torch, example_input)
    try:
        program = torch.export.export(module, (example,), dynamic_shapes=({0: _batch_dim(torch)},))
    except Exception as exc:  # torch raises UserError, GuardOnDataDependentSymNode, RuntimeError, ...
        raise InvalidInputError(
            f"the model cannot be exported with a dynamic batch axis (torch.export): {type(exc).__name__}: {exc}"
        ) from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return path


def export_fixed_program(module: torch.nn.Module, example_input: torch.Tensor, path: Path) -> Path:
    """Save `module` as a `torch.export` program with the example's fixed batch (the LiteRT converters' source)."""
    torch = _torch()
    with contextlib.suppress(NotImplementedError):  # a loaded program's module: fixed as exported, in eval mode
        module.eval()
    program = torch.export.export(module, (example_input,))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return path


def load_trainable(path: Path) -> torch.nn.Module:
    """The trainable module of the program at `path` (parameters require grad; do not call `.train()`)."""
    torch = _torch()
    if not zipfile.is_zipfile(path):
        raise InvalidInputError(f"{path}: not a torch.export program (.pt2)")
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # a damaged or foreign archive: RuntimeError, KeyError, pickle errors
        raise InvalidInputError(f"{path}: not a loadable torch.export program ({type(exc).__name__}: {exc})") from exc
    return program.module()


def input_shape(path: Path) -> tuple[int, ...]:
    """One example's shape (without the batch axis) of the program's single input."""
    torch = _torch()
    program = torch.export.load(str(path))
    names = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    if len(names) != 1:
        raise InvalidInputError(f"{path}: expected a program with one input, found {len(names)}")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == names[0])
    return tuple(int(d) for d in node.meta["val"].shape[1:])


def state_dict_npz(module: torch.nn.Module, path: Path) -> Path:
    """Write the module's state dict as an `.npz` of numpy arrays by parameter name."""
    arrays = {name: tensor.detach().cpu().numpy() for name, tensor in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        np.savez(fh, **arrays)
    return path


def read_state_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` state dict, by parameter name."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: np.asarray(data[name]) for name in data.files}
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{path}: not an .npz of arrays ({exc})") from exc


def check_state(expected: Mapping[str, tuple[int, ...]], arrays: Mapping[str, np.ndarray]) -> None:
    """Refuse arrays that do not fit a module: a missing, extra or differently shaped parameter, named."""
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    wrong = [
        f"{name} {tuple(arrays[name].shape)} (the model has {shape})"
        for name, shape in expected.items()
        if name in arrays and tuple(arrays[name].shape) != tuple(shape)
    ]
    problems = [
        *([f"missing {', '.join(missing)}"] if missing else []),
        *([f"not in the model: {', '.join(extra)}"] if extra else []),
        *([f"shape mismatch: {'; '.join(wrong)}"] if wrong else []),
    ]
    if problems:
        raise InvalidInputError(f"the weights do not fit the model: {'; '.join(problems)}")


def load_state_npz(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Load the `.npz` state dict at `path` into `module` (checked first); returns the module."""
    torch = _torch()
    arrays = read_state_npz(path)
    current = module.state_dict()
    check_state({name: tuple(t.shape) for name, t in current.items()}, arrays)
    state = {name: torch.from_numpy(np.ascontiguousarray(arrays[name])).to(current[name].dtype) for name in current}
    module.load_state_dict(state, strict=True)
    return module


def export_onnx_from_trainable(
    module: torch.nn.Module, input_name: str, output_name: str, path: Path, example: Any
) -> Path:
    """Export `module` (e.g. a retrained trainable form) with torch's dynamo-based exporter into one self-contained
    ONNX file with a dynamic batch axis, its tensors named like the parent's (`input_name` → `output_name`)."""
    torch = _torch()
    with warnings.catch_warnings():
        # A loaded program's module says `training` (and refuses `.eval()`), yet its graph is the exported,
        # eval-mode one: the exporter's warning about training mode does not apply.
        warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
        program = torch.onnx.export(
            module,
            (example,),
            input_names=[input_name],
            output_names=[output_name],
            dynamic_shapes=({0: _batch_dim(torch)},),
            dynamo=True,
            verbose=False,
        )
    if program is None:  # only the legacy exporter returns None
        raise RuntimeError("torch.onnx.export returned no program")
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=False)
    return path
