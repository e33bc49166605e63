"""`compress` end to end on a small budget: real converters, real runtimes, files on disk, exit codes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from compression.cli import EXIT_BAD_INPUT, EXIT_REFUSED, app
from protocol.manifest import MANIFEST_FORMAT_VERSION, read_manifest
from protocol.messages import Datatype

pytestmark = pytest.mark.slow


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_compress_writes_variants_manifest_and_reports(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = _run(
        str(model_dir / "model.onnx"),
        "--calibration", "digits-train",
        "--eval", "digits",
        "--to", "int8-static,int8-dynamic,fp16,tflite-int8",
        "--out", str(out),
        "--latency-iterations", "30",
    )  # fmt: skip
    assert code == 0, stderr
    manifest = json.loads((out / "variants.json").read_text())
    entries = {e["name"]: e for e in manifest["variants"]}
    assert set(entries) == {"fp32", "int8-static", "int8-dynamic", "fp16", "tflite-int8"}
    for entry in entries.values():
        data = (out / entry["file"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["size"] == len(data)
        assert entry["accuracy"] >= entries["fp32"]["accuracy"] - 0.01
        assert 0 < entry["latency"]["p50_ms"] <= entry["latency"]["p99_ms"]
    assert entries["tflite-int8"]["runtime"] == "litert" and entries["fp16"]["runtime"] == "onnxruntime"
    assert "avx512_vnni" in entries["int8-static"]["cpu_features"]
    assert manifest["refused"] == []
    pushed = read_manifest(out)  # what `edgefleet models push --variants` reads
    assert pushed.format_version == manifest["format_version"] == MANIFEST_FORMAT_VERSION
    assert [v.name for v in pushed.variants] == [e["name"] for e in manifest["variants"]]
    assert all(v.inputs and v.outputs for v in pushed.variants)
    assert {t.datatype for v in pushed.variants for t in v.inputs} == {Datatype.FP32}  # clients call all alike
    assert "| - |" not in (out / "report.md").read_text()  # memory measured for every model
    report = json.loads((out / "report.json").read_text())
    assert all(row["peak_rss_bytes"] > 0 for row in report["models"])
    assert "<svg" in (out / "report.html").read_text()
    assert "| tflite-int8 |" in (out / "report.md").read_text() and "| tflite-int8 |" in stdout


def test_compress_exits_nonzero_and_names_the_variant_calibrated_on_constant_data(
    model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code, _, stderr = _run(
        str(model_dir / "model.onnx"),
        "--calibration", "digits-constant",
        "--to", "int8-static,int8-dynamic",
        "--out", str(out),
        "--latency-iterations", "5",
        "--no-memory",
    )  # fmt: skip
    assert code == EXIT_REFUSED
    assert "refused int8-static" in stderr and "pp below fp32" in stderr
    manifest = json.loads((out / "variants.json").read_text())
    # Dynamic quantization needs no calibration, so it still ships; the broken static one does not.
    assert [e["name"] for e in manifest["variants"]] == ["fp32", "int8-dynamic"]
    assert [r["name"] for r in manifest["refused"]] == ["int8-static"]
    assert all(row["peak_rss_bytes"] is None for row in json.loads((out / "report.json").read_text())["models"])


def test_compress_accepts_npz_data_and_a_user_threshold(model_dir: Path, tmp_path: Path) -> None:
    from compression.reference import load_digits_split

    split = load_digits_split()
    np.savez(tmp_path / "cal.npz", x=split.x_train[:64], y=split.y_train[:64])
    np.savez(tmp_path / "eval.npz", x=split.x_test, y=split.y_test)
    code, _, stderr = _run(
        str(model_dir / "model.pt2"),  # the .onnx beside it is the baseline
        "--calibration", str(tmp_path / "cal.npz"),
        "--eval", str(tmp_path / "eval.npz"),
        "--to", "fp16",
        "--max-drop", "0.5",
        "--out", str(tmp_path / "out"),
        "--latency-iterations", "5",
        "--no-memory",
    )  # fmt: skip
    assert code == 0, stderr
    assert json.loads((tmp_path / "out" / "variants.json").read_text())["max_drop_pp"] == 0.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--to", "int4"], "unknown variant"),
        (["--eval", "nowhere.npz"], "neither a file"),
        (["--max-drop", "-1"], "--max-drop"),
    ],
)
def test_compress_rejects_bad_input_with_a_clear_message(
    model_dir: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    code, _, stderr = _run(str(model_dir / "model.onnx"), "--out", str(tmp_path / "o"), *args)
    assert code == EXIT_BAD_INPUT and message in stderr


def test_compress_rejects_a_model_without_its_onnx_baseline(tmp_path: Path) -> None:
    code, _, stderr = _run(str(tmp_path / "absent.onnx"), "--out", str(tmp_path / "o"))
    assert code == EXIT_BAD_INPUT and "does not exist" in stderr


def test_tflite_variant_needs_the_torch_program(model_dir: Path, tmp_path: Path) -> None:
    (model_dir / "model.pt2").unlink()
    code, _, stderr = _run(str(model_dir / "model.onnx"), "--to", "tflite-int8", "--out", str(tmp_path / "o"))
    assert code == EXIT_BAD_INPUT and "torch.export program" in stderr


def test_python_dash_m_compression_runs_the_same_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "compression", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and "--calibration" in done.stdout and "--max-drop" in done.stdout
