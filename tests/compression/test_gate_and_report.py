"""The gate decision, the CPU read for a report, report rendering and data loading: pure logic, no runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from compression.data import load_dataset
from compression.errors import InvalidInputError
from compression.evaluate import CompressionReport, Measurement, gate
from compression.machine import read_cpu
from compression.report import build_document, render_html, render_markdown
from compression.variants import parse_variant_names


def _m(name: str, accuracy: float) -> Measurement:
    return Measurement(name, 1000, accuracy, 1.0, 0.1, 0.2, 10, 50 * 2**20, 2**20)


def test_gate_accepts_a_drop_of_exactly_the_threshold_and_refuses_beyond_it() -> None:
    report = CompressionReport(_m("fp32", 0.97), (_m("a", 0.97), _m("b", 0.96), _m("c", 0.9599), _m("d", 0.98)))
    verdicts = gate(report, max_drop_pp=1.0)
    assert [(v.name, v.accepted) for v in verdicts] == [("a", True), ("b", True), ("c", False), ("d", True)]
    assert verdicts[2].drop_pp == pytest.approx(1.01)
    assert verdicts[3].drop_pp == pytest.approx(-1.0)


def test_gate_with_zero_tolerance_refuses_any_loss() -> None:
    verdicts = gate(CompressionReport(_m("fp32", 0.9), (_m("a", 0.8999),)), max_drop_pp=0.0)
    assert not verdicts[0].accepted


def test_read_cpu_names_the_model_and_the_flags_of_interest(tmp_path: Path) -> None:
    # Flag parsing itself is `protocol.capabilities.isa_flags` (tests/protocol/test_capabilities.py).
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse4_2 avx2 avx512_vnni\n")
    assert read_cpu(cpuinfo) == ("Test CPU 9000", ("sse4_2", "avx2", "avx512_vnni"))
    model, flags = read_cpu(tmp_path / "absent")
    assert model and flags == ()


def test_report_marks_refused_variants_in_every_format() -> None:
    report = CompressionReport(_m("fp32", 0.97), (_m("int8-static", 0.97), _m("int8-broken", 0.25)), "cpu", ("avx2",))
    doc = build_document(report, gate(report), max_drop_pp=1.0)
    assert doc["refused"] == ["int8-broken"]
    assert [row["name"] for row in doc["models"]] == ["fp32", "int8-static", "int8-broken"]
    assert json.loads(json.dumps(doc)) == doc
    markdown = render_markdown(doc)
    assert "| int8-broken |" in markdown and "REFUSED" in markdown and "avx2" in markdown
    page = render_html(doc)
    assert page.count("<svg") == 3 and 'class="refused"' in page


def test_parse_variant_names_refuses_unknown_and_baseline_names() -> None:
    assert parse_variant_names("int8-static, fp16,int8-static") == ["int8-static", "fp16"]
    with pytest.raises(InvalidInputError, match="int4"):
        parse_variant_names("int8-static,int4")
    with pytest.raises(InvalidInputError):
        parse_variant_names("fp32")
    with pytest.raises(InvalidInputError):
        parse_variant_names(" , ")


def test_load_dataset_reads_npz_and_rejects_bad_files(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((3, 64), np.float64), y=np.array([1, 2, 3]))
    data = load_dataset(good)
    assert data.x.dtype == np.float32 and data.shaped((1, 8, 8)).shape == (3, 1, 8, 8)
    with pytest.raises(InvalidInputError, match="takes"):
        data.shaped((3, 3))
    missing_y = tmp_path / "missing.npz"
    np.savez(missing_y, x=np.zeros((3, 64)))
    with pytest.raises(InvalidInputError, match="'x' and 'y'"):
        load_dataset(missing_y)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(InvalidInputError, match="not a readable"):
        load_dataset(garbage)
    with pytest.raises(InvalidInputError, match="neither a file"):
        load_dataset("mnist")
    assert len(load_dataset("digits")) == 450
