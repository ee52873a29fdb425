"""The study report says what a reader needs: end-to-end seconds per slide from the file next to the patch counts,
sites in one sorted order, and the heatmaps a run folder holds."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image as PILImage

from fedslide.client.encoders import build_encoder
from fedslide.client.synth.slide import write_slide
from fedslide.common.config.preprocess import EncoderConfig
from fedslide.common.evaluation.report import Doc, cohort_section, federation_doc, federation_sections
from fedslide.deploy.study.e2e_cost import end_to_end_cost
from tests.feature_sites import tiny_student_bundle

E2E = {
    "slides": 2,
    "site": "siteA",
    "note": "from the file",
    "high": {"patches_per_slide": 160.0, "seconds_per_slide": 8.0, "read_encode_seconds_per_slide": 7.5},
    "low": {"patches_per_slide": 10.0, "seconds_per_slide": 0.8, "read_encode_seconds_per_slide": 0.5},
    "high_over_low": {"patches_per_slide": 16.0, "seconds_per_slide": 10.0, "read_encode_seconds_per_slide": 15.0},
}
MODEL_SIDE = {"high": {"patches_per_slide": 160.0, "seconds_per_slide": 0.01}}
MODEL_SIDE["low"] = {"patches_per_slide": 10.0, "seconds_per_slide": 0.01}


def _png() -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_cost_section_shows_end_to_end_seconds_next_to_patches() -> None:
    doc = Doc("t")
    cost = {"measured": {"models": "centralized", **MODEL_SIDE, "high_over_low": {}}, "end_to_end": E2E}
    federation_sections(doc, {}, cost)
    page = doc.html()
    table = page[page.index("per slide (end to end)") :]
    row = table[table.index("seconds, end to end from the file") :]
    assert "<td>8.000</td><td>0.800</td><td>10.00</td>" in row.split("</tr>")[0]
    patches = table[table.index("patches encoded") :].split("</tr>")[0]
    assert "<td>160.000</td><td>10.000</td><td>16.00</td>" in patches
    assert page.index("end to end") < page.index("MIL-model seconds (no encoding)")  # the figure a site pays first
    skipped = Doc("t")
    federation_sections(skipped, {}, {"end_to_end": {"skipped": "no slide files at the sites"}})
    assert "not measured: no slide files at the sites" in skipped.html()


def _site(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "slides": 4,
        "patients": 4,
        "splits": {"train": 2, "val": 1, "test": 1},
        "classes": {"normal": 2, "tumor": 2},
        "magnification": [20.0],
        "mpp": [0.5],
        "masks": "",
        "held_out_slides": 4,
        "role": "train",
    }


def test_sites_are_listed_in_sorted_order(tmp_path: Path) -> None:
    metrics = {"classes": ["normal", "tumor"], "sites": [_site("zeta"), _site("alpha"), _site("mid")]}
    doc = Doc("t")
    cohort_section(doc, metrics)
    page = doc.html()
    assert page.index("<td>alpha</td>") < page.index("<td>mid</td>") < page.index("<td>zeta</td>")
    fed = {
        "run_id": "r",
        "sites": metrics["sites"],
        "models": {"student_low": {"overall": {}, "held_out": {}, "per_site": {"zeta": {"auc": 0.7}}}},
    }
    page = federation_doc(tmp_path, fed).html()
    header = page[page.index("AUC per site") :]
    assert header.index("alpha") < header.index("mid") < header.index("zeta")


def test_a_runs_heatmaps_are_shown(tmp_path: Path) -> None:
    fed = {"run_id": "r", "sites": [_site("a")], "models": {}}
    assert "Attention heatmaps" not in federation_doc(tmp_path, fed).html()
    (tmp_path / "heatmaps" / "a").mkdir(parents=True)
    for name in ("s2", "s1"):
        (tmp_path / "heatmaps" / "a" / f"{name}.png").write_bytes(_png())
    page = federation_doc(tmp_path, fed).html()
    assert "Attention heatmaps" in page and page.count("data:image/png;base64,") == 2
    assert page.index("a/s1") < page.index("a/s2")


@pytest.mark.slow
def test_end_to_end_cost_times_both_resolutions_from_the_file(tmp_path: Path) -> None:
    encoder = build_encoder(EncoderConfig())
    tiny_student_bundle(encoder, ["normal", "tumor"], student_input="raw", token_grid=0).save(tmp_path / "bundle")
    write_slide(tmp_path / "s.tif", 1000, 1000, 0.5, "generic", seed=3, tumor=True)
    cost = end_to_end_cost(tmp_path / "bundle", [tmp_path / "s.tif"], threads=1)
    assert "skipped" not in cost, cost
    high, low = cost["high"], cost["low"]
    assert high["patches_per_slide"] > low["patches_per_slide"] > 0
    assert high["seconds_per_slide"] > high["read_encode_seconds_per_slide"] > 0
    assert cost["high_over_low"]["patches_per_slide"] == pytest.approx(
        high["patches_per_slide"] / low["patches_per_slide"]
    )
    assert "skipped" in end_to_end_cost(tmp_path / "nowhere", [tmp_path / "s.tif"])
