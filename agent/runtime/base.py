"""The runtime interface: a `ModelRuntime` loads a file of one format into a thread-safe `LoadedModel`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from protocol import ModelFormat, TensorSpec

__all__ = ["DeclaredTensors", "LoadedModel", "ModelRuntime"]


@runtime_checkable
class LoadedModel(Protocol):
    """A model ready to serve. `infer` may be called from many threads at once."""

    @property
    def inputs(self) -> list[TensorSpec]:
        """The model's inputs, as the runtime reports them (`-1` = dynamic dimension)."""
        ...

    @property
    def outputs(self) -> list[TensorSpec]:
        """The model's outputs, in the order `infer` returns them."""
        ...

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference. Raises `InferenceInputError` (bad tensors) or `InferenceFailedError`."""
        ...


class ModelRuntime(Protocol):
    """Loads model files of one format."""

    @property
    def format(self) -> ModelFormat:
        """The model format this runtime loads."""
        ...

    @property
    def name(self) -> str:
        """Name and version reported in the device's capabilities, e.g. `onnxruntime-1.32.0`."""
        ...

    def load(self, path: Path) -> LoadedModel:
        """Load `path`; raises `InvalidModelError` when the runtime refuses the file."""
        ...


class DeclaredTensors:
    """Base of runtime models: holds the tensor specs the runtime reported at load time."""

    def __init__(self, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        self._inputs = inputs
        self._outputs = outputs

    @property
    def inputs(self) -> list[TensorSpec]:
        """The model's inputs, as the runtime reports them (`-1` = dynamic dimension)."""
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        """The model's outputs, in the order `infer` returns them."""
        return list(self._outputs)
