"""The runtimes one agent can use, by model format (one catalog per agent, nothing process-global)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

from agent.errors import ConfigError, UnsupportedFormatError
from agent.runtime.base import ModelRuntime
from agent.runtime.onnx import OnnxRuntime
from agent.runtime.tflite import LiteRtRuntime
from protocol import ModelFormat

__all__ = ["RuntimeCatalog", "available_runtimes", "default_catalog"]


class RuntimeCatalog:
    """The runtimes one agent can use, looked up by `ModelFormat`."""

    def __init__(self, runtimes: Iterable[ModelRuntime] = ()) -> None:
        self._by_format: dict[ModelFormat, ModelRuntime] = {}
        for runtime in runtimes:
            self.register(runtime)

    def register(self, runtime: ModelRuntime) -> None:
        """Add (or replace) the runtime for `runtime.format`."""
        self._by_format[runtime.format] = runtime

    def for_format(self, fmt: ModelFormat) -> ModelRuntime:
        """The runtime for `fmt`; `UnsupportedFormatError` if this device has none."""
        try:
            return self._by_format[fmt]
        except KeyError:
            have = ", ".join(sorted(f.value for f in self._by_format)) or "none"
            raise UnsupportedFormatError(f"no runtime for format {fmt.value!r} on this device (have: {have})") from None

    @property
    def formats(self) -> list[ModelFormat]:
        """Formats this catalog can load."""
        return sorted(self._by_format, key=lambda f: f.value)

    def names(self) -> list[str]:
        """Runtime names for the device's capabilities."""
        return [self._by_format[f].name for f in self.formats]

    def restricted_to(self, names: Iterable[str]) -> RuntimeCatalog:
        """A catalog with only the runtimes named (bare names: `onnxruntime`, `litert`, `tflite_runtime`).

        `ConfigError` names what is installed when a wanted runtime is not.
        """
        installed = {r.name.partition("-")[0]: r for r in self._by_format.values()}
        missing = [n for n in names if not _equivalent(n) & installed.keys()]
        if missing:
            have = ", ".join(sorted(installed)) or "none"
            raise ConfigError(f"runtimes {missing} are not installed on this device (installed: {have})")
        wanted = set().union(*(_equivalent(n) for n in names))
        return RuntimeCatalog(r for name, r in installed.items() if name in wanted)


def _equivalent(name: str) -> set[str]:
    """LiteRT and the older tflite_runtime serve the same models through the same interpreter API."""
    return {"litert", "tflite_runtime"} if name in {"litert", "tflite_runtime"} else {name}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def default_catalog(intra_op_threads: int = 1) -> RuntimeCatalog:
    """Every runtime installed on this device, configured with `intra_op_threads`."""
    catalog = RuntimeCatalog()
    if _installed("onnxruntime"):
        catalog.register(OnnxRuntime(intra_op_threads))
    if _installed("ai_edge_litert") or _installed("tflite_runtime"):
        catalog.register(LiteRtRuntime(intra_op_threads))
    return catalog


def available_runtimes() -> list[str]:
    """Names of the runtimes installed on this device (for `Capabilities.runtimes`)."""
    return default_catalog().names()
