"""Session fixtures: the reference CNN is trained once, and every variant built once, per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.services import require_convert_extra

require_convert_extra(module_level=True)

from compression.cnn import ReferenceCNN, build_reference_cnn  # noqa: E402  (after the check that torch is there)
from compression.data import Dataset, load_dataset  # noqa: E402
from compression.variants import VARIANT_SPECS, BuiltVariant, build_variant, describe_file  # noqa: E402


@pytest.fixture(scope="session")
def reference_cnn(tmp_path_factory: pytest.TempPathFactory) -> ReferenceCNN:
    """The reference CNN, trained and exported (ONNX + torch.export) once per session."""
    return build_reference_cnn(tmp_path_factory.mktemp("cnn"))


@pytest.fixture(scope="session")
def eval_set() -> Dataset:
    """The held-out digits."""
    return load_dataset("digits")


@pytest.fixture(scope="session")
def built_variants(tmp_path_factory: pytest.TempPathFactory, reference_cnn: ReferenceCNN) -> dict[str, BuiltVariant]:
    """fp32 and every variant, calibrated on the digits training split."""
    out = tmp_path_factory.mktemp("variants")
    calibration = load_dataset("digits-train")
    variants = {"fp32": describe_file(VARIANT_SPECS["fp32"], reference_cnn.onnx_path)}
    for name in VARIANT_SPECS:
        if name != "fp32":
            variants[name] = build_variant(
                name,
                onnx_model=reference_cnn.onnx_path,
                torch_program=reference_cnn.program_path,
                calibration=calibration,
                out_dir=out,
            )
    return variants


@pytest.fixture
def model_dir(tmp_path: Path, reference_cnn: ReferenceCNN) -> Path:
    """A copy of the reference model pair (`model.onnx` + `model.pt2`) in a directory of this test's own."""
    (tmp_path / "model.onnx").write_bytes(reference_cnn.onnx_path.read_bytes())
    (tmp_path / "model.pt2").write_bytes(reference_cnn.program_path.read_bytes())
    return tmp_path
