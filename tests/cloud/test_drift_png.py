"""The drift report as a PNG image: through the API (any valid token, none refused) and the CLI, from real devices'
sketches of a real model, one site drifted; the drawing itself on hand-made drift dicts (a key missing draws "-")."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlmodel import Session

from cloud.auth import Role
from cloud.cli.drift import report_format
from cloud.drift.png import render_png
from cloud.services.tokens import create_token
from tests.cloud.cli_helpers import in_process_cli
from tests.cloud.conftest import Api
from tests.cloud.drift_helpers import profiled_fleet, send_traffic

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SITES = {"a-1": "a", "a-2": "a", "b-1": "b", "b-2": "b"}


@pytest.fixture
def drifted_fleet(api: Api, digits_model_path: Path) -> Api:
    """digits:1.0 with its reference profile on four devices; site b's inputs are noisy (drifted)."""
    devices, model, _, _ = profiled_fleet(api, digits_model_path, SITES)
    send_traffic(api.coordinator, devices, model=model, drift={"b-1": "noise=0.5", "b-2": "noise=0.5"})
    return api


def _decoded(png: bytes) -> Image.Image:
    """The image, after checking the signature and that the IHDR says what Pillow read."""
    assert png[:8] == PNG_SIGNATURE and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    image = Image.open(io.BytesIO(png))
    image.load()  # decodes every pixel: a truncated or corrupt file fails here
    assert image.format == "PNG" and image.size == (width, height)
    return image


def _cohort(name: str, *, drifted: bool) -> dict[str, Any]:
    ks = 0.8 if drifted else 0.02
    return {
        "cohort": name, "devices": ["d1", "d2"], "rows": 800, "drifted": drifted, "insufficient": False,
        "features": [{"index": i, "ks": ks, "critical": 0.12, "drifted": drifted} for i in range(8)],
        "class_counts": {str(i): (300 if drifted and i == 0 else 80) for i in range(10)},
        "class_psi": 0.6 if drifted else 0.01, "confidence_median": 0.6 if drifted else 0.95,
        "reference_confidence_median": 0.95, "estimated_accuracy": 0.7 if drifted else 0.96,
        "reference_accuracy": 0.96,
    }  # fmt: skip


def _drift(*cohorts: dict[str, Any]) -> dict[str, Any]:
    reference = {"rows": 1000, "accuracy": 0.97, "source": "digits", "feature_mode": "chunk_means", "features": 8,
                 "class_counts": {str(i): 100 for i in range(10)}}  # fmt: skip
    return {"model": "digits", "version": "1.0", "by": "site", "window_s": 3600, "reference": reference,
            "cohorts": list(cohorts)}  # fmt: skip


def test_drift_report_png_decodes_with_a_row_per_cohort(drifted_fleet: Api) -> None:
    api = drifted_fleet
    response = api.client.get("/api/v1/drift/digits/1.0/report", params={"by": "site", "format": "png"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = _decoded(response.content)
    width, height = image.size
    assert 1200 <= width <= 2000 and 400 <= height <= 1200  # two cohorts: two rows of charts, a readable width
    same = api.client.get("/api/v1/drift/digits/1.0/report.png", params={"by": "site"})
    assert same.status_code == 200 and _decoded(same.content).size == image.size
    fleet_only = _decoded(api.client.get("/api/v1/drift/digits/1.0/report.png").content)
    assert fleet_only.size[1] < height  # one cohort (the fleet): one row
    # HTML stays the default.
    page = api.client.get("/api/v1/drift/digits/1.0/report", params={"by": "site"})
    assert page.headers["content-type"].startswith("text/html") and "site=b" in page.text


def test_drift_report_png_needs_a_token_and_any_role_may_read_it(drifted_fleet: Api) -> None:
    api = drifted_fleet
    path = "/api/v1/drift/digits/1.0/report?format=png"
    assert api.anonymous.get(path).status_code == 401
    assert api.anonymous.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401
    with Session(api.coordinator.engine) as session:
        viewer, _ = create_token(session=session, name="viewer", role=Role.VIEWER, created_by="test")
    seen = api.anonymous.get(path, headers={"Authorization": f"Bearer {viewer}"})
    assert seen.status_code == 200 and seen.content.startswith(PNG_SIGNATURE)
    assert api.client.get("/api/v1/drift/digits/1.0/report?format=gif").status_code == 422
    assert api.client.get("/api/v1/drift/nomodel/1.0/report.png").status_code == 404


def test_drift_report_command_writes_png_by_suffix_or_flag(
    drifted_fleet: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = in_process_cli(drifted_fleet, monkeypatch)
    by_suffix = tmp_path / "drift.png"
    result = run("drift", "report", "digits:1.0", "--by", "site", "-o", str(by_suffix))
    assert result.exit_code == 0, result.output
    _decoded(by_suffix.read_bytes())
    by_flag = tmp_path / "report.img"
    result = run("drift", "report", "digits:1.0", "--format", "png", "-o", str(by_flag))
    assert result.exit_code == 0, result.output
    _decoded(by_flag.read_bytes())
    unknown = run("drift", "report", "digits:1.0", "-o", str(tmp_path / "drift.pdf"))
    assert unknown.exit_code == 1 and "--format" in unknown.output and not (tmp_path / "drift.pdf").exists()


def test_report_format_comes_from_the_flag_then_the_suffix() -> None:
    assert report_format(None, None) == "html"
    assert report_format(Path("x.HTML"), None) == "html" and report_format(Path("x.png"), None) == "png"
    assert report_format(Path("x.png"), "html") == "html"
    with pytest.raises(ValueError, match="html or png"):
        report_format(None, "svg")


def test_a_drifted_cohort_is_drawn_differently_from_a_clean_one() -> None:
    clean = render_png(_drift(_cohort("site=a", drifted=False)))
    drifted = render_png(_drift(_cohort("site=a", drifted=True)))
    assert clean != drifted
    clean_px, drifted_px = (_decoded(png).convert("RGB") for png in (clean, drifted))
    assert clean_px.size == drifted_px.size

    def red(image: Image.Image) -> int:  # the drift colour (#a11) marks drifted features and the cohort's title
        rgb = np.asarray(image, dtype=np.int32)
        return int(((rgb[..., 0] > 140) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)).sum())

    assert red(drifted_px) > 20 * max(1, red(clean_px))


def test_a_report_missing_keys_or_cohorts_still_draws() -> None:
    sparse = _drift({"cohort": "site=x", "features": []})  # an older coordinator's dict, labelled accuracy unknown
    sparse["reference"] = {}
    _decoded(render_png(sparse))
    _decoded(render_png(_drift()))  # no telemetry in the window: one line saying so
    labelled = _cohort("site=a", drifted=False) | {"labelled_accuracy": 0.5}
    assert render_png(_drift(labelled)) != render_png(_drift(_cohort("site=a", drifted=False)))
