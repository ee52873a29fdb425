"""`fedslide predict`'s report.html: one row per slide (prediction, out-of-distribution score and flag) and the
slides' heatmaps, self-contained (figures as data URIs), from the run's predictions.csv, timing.json and heatmaps/."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from fedslide.common.evaluation.report import Doc, Image

REPORT_FILE = "report.html"


def _rows(out_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (out_dir / "predictions.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = sorted(reader, key=lambda r: r["slide_id"])
        return list(reader.fieldnames or []), rows


def prediction_doc(out_dir: Path) -> Doc:
    """The report of one predict run folder (predictions.csv must exist)."""
    header, rows = _rows(out_dir)
    timing: dict[str, Any] = {}
    if (out_dir / "timing.json").is_file():
        timing = json.loads((out_dir / "timing.json").read_text())
    summary = timing.get("summary", {})
    ood = summary.get("ood")
    doc = Doc(f"fedslide predict — {out_dir.name}")
    doc.p(
        f"{len(rows)} slide(s) predicted at {timing.get('resolution', '?')} resolution; encoder "
        f"{(timing.get('encoder') or {}).get('name', '?')}; end to end {summary.get('total_s_mean', 'n/a')} s/slide "
        "(mean, from opening the slide file to the probabilities)."
    )
    if ood is not None:
        doc.h(2, "Out-of-distribution check")
        threshold = ood.get("threshold")
        flagged = ood.get("flagged", [])
        if threshold is None:
            doc.p("The bundle has no OOD threshold (it was made without validation slides): scores only, no flag.")
        elif flagged:
            doc.p(
                f"WARNING: {len(flagged)} slide(s) look unlike the slides the model was trained on (OOD score > "
                f"{threshold:.3f}); their predictions may be unreliable: {', '.join(flagged)}."
            )
        else:
            doc.p(f"No slide is out of distribution: every OOD score is at most the threshold {threshold:.3f}.")
        doc.p(
            "OOD score: root-mean-square z-score of the slide's mean low-res feature against the training slides' "
            f"per-feature mean and variance ({ood.get('slides')} training slides); threshold: the "
            f"{ood.get('quantile')} quantile of {ood.get('val_slides')} validation slides' scores.",
            note=True,
        )
    doc.h(2, "Predictions")
    keep = [c for c in header if c.startswith("prob_") or c in ("predicted", "patches_low", "seconds", "ood_score")]
    table = []
    for r in rows:
        flag = "OOD" if r.get("ood_flag") == "1" else ""
        table.append([r["slide_id"], *(r.get(c, "") for c in keep), *([flag] if "ood_flag" in header else [])])
    doc.table(["slide", *keep, *(["ood flag"] if "ood_flag" in header else [])], table)
    images = []
    for r in rows:
        path = out_dir / "heatmaps" / f"{r['slide_id']}.png"
        if path.is_file():
            caption = f"{r['slide_id']}: predicted {r['predicted']}" + (" — OOD" if r.get("ood_flag") == "1" else "")
            images.append(Image(f"heatmap_{r['slide_id']}.png", path.read_bytes(), caption))
    if images:
        doc.grid("Attention heatmaps", images)
    return doc


def write_prediction_report(out_dir: Path | str) -> Path:
    """Write `out_dir/report.html` for a predict run folder; returns its path."""
    out = Path(out_dir)
    path = out / REPORT_FILE
    path.write_text(prediction_doc(out).html() + "\n")
    return path
