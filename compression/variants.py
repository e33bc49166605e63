"""Build the compressed variants of one model with the converters' own tooling (no home-made quantizer).

| variant        | source          | tool                                               | runtime     |
|----------------|-----------------|----------------------------------------------------|-------------|
| `int8-static`  | ONNX fp32       | `quantize_static`, QDQ, per-channel weights        | onnxruntime |
| `int8-dynamic` | ONNX fp32       | `onnxruntime.quantization.quantize_dynamic`        | onnxruntime |
| `fp16`         | ONNX fp32       | `compression.fp16`, onnxconverter-common, FP32 I/O | onnxruntime |
| `tflite-int8`  | torch.export    | torchao PT2E + litert-torch's `PT2EQuantizer`      | litert      |
| `tflite-fp32`  | torch.export    | `litert_torch.convert`                             | litert      |

The ONNX source is the self-contained fp32 baseline (`compression.baseline`). A TFLite variant takes the
ONNX model's tensor names and the program's batch (a program exported with a batch of 2 gives a batch-2
model; the agent serves it any batch, see `agent.runtime.tflite`).
"""

from __future__ import annotations

import hashlib
import keyword
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compression.data import Dataset, fixed_batches
from compression.errors import ConversionError, ConverterUnavailableError, InvalidInputError
from compression.fp16 import convert_fp16

__all__ = [
    "VARIANT_SPECS",
    "BuiltVariant",
    "VariantSpec",
    "build_variant",
    "describe_file",
    "missing_source",
    "parse_variant_names",
]

log = logging.getLogger(__name__)

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


def missing_source(name: str, *, onnx_model: Path | None, torch_program: Path | None) -> str | None:
    """Why variant `name` cannot be built from the sources given (the source it needs is absent), or None."""
    spec = VARIANT_SPECS[name]
    if spec.source == "onnx":
        return None if onnx_model is not None and onnx_model.is_file() else f"no fp32 ONNX model ({onnx_model})"
    if torch_program is not None and torch_program.is_file():
        return None
    return (
        "it is converted from a torch.export program (.pt2), and none was given: put MODEL.pt2 beside the "
        "ONNX file or pass --torch-program"
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
    missing = missing_source(name, onnx_model=onnx_model, torch_program=torch_program)
    if missing is not None:
        raise InvalidInputError(f"variant {name} cannot be built: {missing}")
    source = onnx_model if spec.source == "onnx" else torch_program
    assert source is not None  # missing_source said so
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}{spec.suffix}"
    try:
        if name == "int8-static":
            _int8_static(source, target, calibration)
        elif name == "int8-dynamic":
            _int8_dynamic(source, target)
        elif name == "fp16":
            convert_fp16(source, target)
        else:
            convert = _tflite_int8 if name == "tflite-int8" else _tflite_fp32
            convert(source, target, calibration, _onnx_names(onnx_model))
    except (InvalidInputError, ConverterUnavailableError, ConversionError):
        raise
    except Exception as exc:  # converters raise anything from RuntimeError to their own types
        raise ConversionError(f"building {name} from {source.name} failed: {type(exc).__name__}: {exc}") from exc
    return describe_file(spec, target)


class _CalibrationReader:
    """Feeds calibration samples to ONNX Runtime's calibrator one batch at a time."""

    def __init__(self, input_name: str, x: np.ndarray, fixed_batch: int | None = None) -> None:
        # A model with a fixed batch takes exactly that many samples per run; else 32 at a time.
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            {input_name: chunk} for chunk, _ in fixed_batches(x, fixed_batch or 32)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _onnx_input(path: Path) -> tuple[str, tuple[int, ...], int | None]:
    """The input's name, its per-sample shape and its fixed batch (None when the batch axis is dynamic)."""
    import onnx

    graph_input = onnx.load(str(path), load_external_data=False).graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim
    batch = int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None
    return graph_input.name, tuple(max(1, int(d.dim_value)) for d in dims[1:]), batch


def _onnx_names(path: Path | None) -> tuple[str, list[str]] | None:
    """(input name, output names) of the ONNX model, which the TFLite signature takes over; None without one."""
    if path is None:
        return None
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializers]
    return inputs[0], [o.name for o in graph.output]


def _int8_static(source: Path, target: Path, calibration: Dataset) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name, sample_shape, batch = _onnx_input(source)
    prepared = target.with_suffix(".prep.onnx")
    quant_pre_process(str(source), str(prepared))
    try:
        samples = calibration.head(CALIBRATION_SAMPLES).shaped(sample_shape)

        # U8 activations / S8 weights in QDQ: ONNX Runtime's recommended CPU scheme (docstring of quantize_static);
        # S8 activations measured 1.7x slower on MobileNetV2 (1.02 vs 0.59 ms, EPYC with AVX-512 VNNI). Per-channel
        # weight scales: once batch norm is folded in, the channels of one convolution differ in range (up to 100x in
        # MobileNetV2's depthwise ones), and one scale for all leaves the typical channel a few of its 8 bits; it
        # costs no speed (QLinearConv takes per-channel scales). No reduce_range: with VNNI (what this variant's
        # `accelerated_by` names) u8 x s8 products do not saturate; without it they may, per-channel weights above
        # all (quantize_static's docstring), which a device without VNNI only risks when nothing else runs there.
        def quantize(per_channel: bool) -> None:
            quantize_static(
                str(prepared),
                str(target),
                _CalibrationReader(input_name, samples, batch),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                calibrate_method=CalibrationMethod.MinMax,
            )

        try:
            quantize(per_channel=True)
        except Exception as exc:  # the quantizer's per-channel path fails on some graphs (skl2onnx's MatMul/Gemm)
            log.info("int8-static: per-channel failed (%s: %s); per-tensor instead", type(exc).__name__, exc)
            target.unlink(missing_ok=True)
            quantize(per_channel=False)  # a failure here is the variant's failure
    finally:
        prepared.unlink(missing_ok=True)


def _int8_dynamic(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_suffix(".prep.onnx")
    quant_pre_process(str(source), str(prepared))
    try:
        quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)


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


_Names = tuple[str, list[str]] | None  # the ONNX model's (input name, output names)


def _tflite_fp32(source: Path, target: Path, calibration: Dataset, names: _Names) -> None:
    litert_torch = _litert()
    torch, program = _load_program(source)
    example = _example_input(program, torch)
    named, kwargs = _named(torch, program.module(), names, example)
    litert_torch.convert(named, sample_kwargs=kwargs).export(str(target))


def _tflite_int8(source: Path, target: Path, calibration: Dataset, names: _Names) -> None:
    """Static int8 (weights and activations) through PT2E: prepare, calibrate, convert, lower to LiteRT."""
    litert_torch = _litert()
    from litert_torch.quantize import pt2e_quantizer, quant_config
    from torchao.quantization.pt2e import quantize_pt2e

    torch, program = _load_program(source)
    example = _example_input(program, torch)
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True)
    )
    module = quantize_pt2e.prepare_pt2e(program.module(), quantizer)
    samples = calibration.head(CALIBRATION_SAMPLES).shaped(tuple(example.shape[1:]))
    with torch.no_grad():
        for chunk, _ in fixed_batches(samples, int(example.shape[0])):  # the program's own (static) batch
            module(torch.from_numpy(chunk))
    module = quantize_pt2e.convert_pt2e(module, fold_quantize=False)
    config = quant_config.QuantConfig(pt2e_quantizer=quantizer)
    named, kwargs = _named(torch, module, names, example)
    litert_torch.convert(named, sample_kwargs=kwargs, quant_config=config).export(str(target))


def _named(torch: Any, module: Any, names: _Names, example: Any) -> tuple[Any, dict[str, Any]]:
    """`module` with the ONNX model's tensor names in its TFLite signature (e.g. `input` → `logits`), so that
    clients call every variant of a version alike instead of litert-torch's `args_0` / `output_0`; and the
    sample keyword arguments that name the input."""
    input_name, output_names = names or ("input", ["logits"])
    if not input_name.isidentifier() or keyword.iskeyword(input_name):
        raise ConversionError(
            f"the ONNX input {input_name!r} cannot name a TFLite signature input (a Python identifier is needed), "
            "so the TFLite variant could not be called like the ONNX ones; export the ONNX model with "
            "input_names=['input']"
        )

    class Named(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, **inputs: Any) -> dict[str, Any]:
            result = self.inner(*inputs.values())
            results = tuple(result) if isinstance(result, tuple | list) else (result,)
            if len(results) != len(output_names):
                raise ValueError(
                    f"the .pt2 program returns {len(results)} output(s), the ONNX model {len(output_names)} "
                    f"({output_names}): they are not the same model"
                )
            return dict(zip(output_names, results, strict=True))

    return Named(), {input_name: example}


def _example_input(program: Any, torch: Any) -> Any:
    """Zeros of the program's input shape; a dynamic dimension (a symbol) becomes 1."""
    placeholders = [spec.arg.name for spec in program.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]
    nodes = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    shapes = [tuple(d if isinstance(d, int) else 1 for d in nodes[name].meta["val"].shape) for name in placeholders]
    if len(shapes) != 1:
        raise InvalidInputError(f"expected a torch.export program with one input, found {len(shapes)}")
    return torch.zeros(*shapes[0])
