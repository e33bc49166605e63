"""Build the compressed variants of one model with the converters' own tooling (no home-made quantizer).

| variant        | source          | tool                                               | runtime     |
|----------------|-----------------|----------------------------------------------------|-------------|
| `int8-static`  | ONNX fp32       | `onnxruntime.quantization.quantize_static`, QDQ    | onnxruntime |
| `int8-dynamic` | ONNX fp32       | `onnxruntime.quantization.quantize_dynamic`        | onnxruntime |
| `fp16`         | ONNX fp32       | `onnxconverter_common.float16`, FP32 I/O kept      | onnxruntime |
| `tflite-int8`  | torch.export    | torchao PT2E + litert-torch's `PT2EQuantizer`      | litert      |
| `tflite-fp32`  | torch.export    | `litert_torch.convert`                             | litert      |
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compression.cnn import INPUT_NAME, OUTPUT_NAME
from compression.data import Dataset
from compression.errors import ConversionError, ConverterUnavailableError, InvalidInputError

__all__ = [
    "VARIANT_SPECS",
    "BuiltVariant",
    "VariantSpec",
    "build_variant",
    "describe_file",
    "parse_variant_names",
]

CALIBRATION_SAMPLES = 256


@dataclass(frozen=True)
class VariantSpec:
    """What a variant is: its file format, numeric precision, source model and runtime."""

    name: str
    format: str  # "onnx" or "tflite"
    precision: str  # "fp32", "fp16", "int8"
    source: str  # "onnx" (the fp32 ONNX file) or "torch" (the torch.export program)
    runtime: str  # "onnxruntime" or "litert"
    # CPU features that make this variant fast; none is required (the runtimes fall back to plain kernels).
    accelerated_by: tuple[str, ...] = ()

    @property
    def suffix(self) -> str:
        """File suffix of this format."""
        return f".{self.format}"


_INT8_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
_FP16_FEATURES = ("avx512_fp16", "f16c", "asimdhp")

VARIANT_SPECS: dict[str, VariantSpec] = {
    spec.name: spec
    for spec in (
        VariantSpec("fp32", "onnx", "fp32", "onnx", "onnxruntime"),
        VariantSpec("int8-static", "onnx", "int8", "onnx", "onnxruntime", _INT8_FEATURES),
        VariantSpec("int8-dynamic", "onnx", "int8", "onnx", "onnxruntime", _INT8_FEATURES),
        VariantSpec("fp16", "onnx", "fp16", "onnx", "onnxruntime", _FP16_FEATURES),
        VariantSpec("tflite-int8", "tflite", "int8", "torch", "litert", _INT8_FEATURES),
        VariantSpec("tflite-fp32", "tflite", "fp32", "torch", "litert"),
    )
}


@dataclass(frozen=True)
class BuiltVariant:
    """A built variant file and what a device needs to run it."""

    name: str
    path: Path
    format: str
    precision: str
    runtime: str
    cpu_features: tuple[str, ...]
    size_bytes: int
    sha256: str


def parse_variant_names(text: str) -> list[str]:
    """Split `int8-static,fp16` into known variant names, refusing unknown ones and `fp32` (the baseline)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in VARIANT_SPECS or n == "fp32"]
    if unknown or not names:
        known = ", ".join(n for n in VARIANT_SPECS if n != "fp32")
        raise InvalidInputError(f"unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from {known}")
    return list(dict.fromkeys(names))


def describe_file(spec: VariantSpec, path: Path) -> BuiltVariant:
    """Size, digest and runtime needs of a variant file."""
    data = path.read_bytes()
    return BuiltVariant(
        name=spec.name,
        path=path,
        format=spec.format,
        precision=spec.precision,
        runtime=spec.runtime,
        cpu_features=spec.accelerated_by,
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def build_variant(
    name: str,
    *,
    onnx_model: Path | None,
    torch_program: Path | None,
    calibration: Dataset,
    out_dir: Path,
) -> BuiltVariant:
    """Build variant `name` into `out_dir/<name>.<format>` from the model source it needs."""
    spec = VARIANT_SPECS[name]
    source = onnx_model if spec.source == "onnx" else torch_program
    if source is None or not source.is_file():
        what = "an fp32 ONNX model" if spec.source == "onnx" else "a torch.export program (.pt2)"
        raise InvalidInputError(f"variant {name} is built from {what}, and none was found ({source})")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}{spec.suffix}"
    builders = {
        "int8-static": _int8_static,
        "int8-dynamic": _int8_dynamic,
        "fp16": _fp16,
        "tflite-int8": _tflite_int8,
        "tflite-fp32": _tflite_fp32,
    }
    try:
        builders[name](source, target, calibration)
    except (InvalidInputError, ConverterUnavailableError):
        raise
    except Exception as exc:  # converters raise anything from RuntimeError to their own types
        raise ConversionError(f"building {name} from {source.name} failed: {type(exc).__name__}: {exc}") from exc
    return describe_file(spec, target)


class _CalibrationReader:
    """Feeds calibration samples to ONNX Runtime's calibrator one batch at a time."""

    def __init__(self, input_name: str, x: np.ndarray, batch: int = 32) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            {input_name: x[i : i + batch]} for i in range(0, len(x), batch)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _onnx_input(path: Path) -> tuple[str, tuple[int, ...]]:
    import onnx

    graph_input = onnx.load(str(path), load_external_data=False).graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim[1:]
    return graph_input.name, tuple(int(d.dim_value) for d in dims)


def _int8_static(source: Path, target: Path, calibration: Dataset) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name, sample_shape = _onnx_input(source)
    prepared = target.with_suffix(".prep.onnx")
    quant_pre_process(str(source), str(prepared))
    try:
        reader = _CalibrationReader(input_name, calibration.head(CALIBRATION_SAMPLES).shaped(sample_shape))
        # U8 activations / S8 weights in QDQ: ONNX Runtime's recommended CPU scheme (docstring of quantize_static).
        quantize_static(
            str(prepared),
            str(target),
            reader,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=False,
            calibrate_method=CalibrationMethod.MinMax,
        )
    finally:
        prepared.unlink(missing_ok=True)


def _int8_dynamic(source: Path, target: Path, calibration: Dataset) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_suffix(".prep.onnx")
    quant_pre_process(str(source), str(prepared))
    try:
        quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)


def _fp16(source: Path, target: Path, calibration: Dataset) -> None:
    import onnx

    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise ConverterUnavailableError("onnxconverter-common is missing: pip install 'edgefleet[convert]'") from exc
    model = onnx.load(str(source))
    # keep_io_types: devices call the fp16 model with the same FP32 tensors as the fp32 one.
    converted = float16.convert_float_to_float16(model, keep_io_types=True)
    onnx.save(converted, str(target))


def _load_program(source: Path) -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ConverterUnavailableError("PyTorch is missing: pip install 'edgefleet[convert]'") from exc
    return torch, torch.export.load(str(source))


def _litert() -> Any:
    try:
        import litert_torch
    except ImportError as exc:
        raise ConverterUnavailableError("litert-torch is missing: pip install 'edgefleet[convert]'") from exc
    litert_torch.config.show_progress = False  # its step-by-step console log would drown our own progress
    return litert_torch


def _tflite_fp32(source: Path, target: Path, calibration: Dataset) -> None:
    litert_torch = _litert()
    torch, program = _load_program(source)
    example = _example_args(program, torch)
    litert_torch.convert(_named(torch, program.module()), sample_kwargs={INPUT_NAME: example[0]}).export(str(target))


def _tflite_int8(source: Path, target: Path, calibration: Dataset) -> None:
    """Static int8 (weights and activations) through PT2E: prepare, calibrate, convert, lower to LiteRT."""
    litert_torch = _litert()
    from litert_torch.quantize import pt2e_quantizer, quant_config
    from torchao.quantization.pt2e import quantize_pt2e

    torch, program = _load_program(source)
    example = _example_args(program, torch)
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True)
    )
    module = quantize_pt2e.prepare_pt2e(program.module(), quantizer)
    samples = calibration.head(CALIBRATION_SAMPLES).shaped(tuple(example[0].shape[1:]))
    with torch.no_grad():
        for i in range(len(samples)):  # the program has a static batch of 1
            module(torch.from_numpy(samples[i : i + 1]))
    module = quantize_pt2e.convert_pt2e(module, fold_quantize=False)
    config = quant_config.QuantConfig(pt2e_quantizer=quantizer)
    named = _named(torch, module)
    litert_torch.convert(named, sample_kwargs={INPUT_NAME: example[0]}, quant_config=config).export(str(target))


def _named(torch: Any, module: Any) -> Any:
    """`module` with the ONNX model's tensor names in its TFLite signature (`input` → `logits`), so that
    clients call every variant of a version alike instead of litert-torch's `args_0` / `output_0`."""

    class Named(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, input: Any) -> dict[str, Any]:
            return {OUTPUT_NAME: self.inner(input)}

    return Named()


def _example_args(program: Any, torch: Any) -> tuple[Any, ...]:
    placeholders = [spec.arg.name for spec in program.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]
    nodes = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    shapes = [tuple(int(d) for d in nodes[name].meta["val"].shape) for name in placeholders]
    if len(shapes) != 1:
        raise InvalidInputError(f"expected a program with one input, found {len(shapes)}")
    return (torch.zeros(*shapes[0]),)
