"""End-to-end cost per slide for the study report: `fedslide predict` run from the slide file at low resolution
(student on 5x patches) and at high resolution (teacher on every kept 20x patch), encoding included.

The study's MIL-model seconds (on feature files) leave out patch reading and encoding, which dominate, so that
low-res looks as slow as high-res there; these figures are what a site pays per slide.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedslide.client.inference import predict_slides
from fedslide.common.config.predict import PredictConfig

log = logging.getLogger(__name__)

NOTE = (
    "End to end: `fedslide predict` from opening the slide file to the class probabilities (thumbnail, tissue, "
    "grid, patch reading and encoding, model), on the same slides at both resolutions, one process, no heatmaps."
)


def end_to_end_cost(bundle_dir: Path, slides: Sequence[Path], threads: int | None = None) -> dict[str, Any]:
    """{"slides", "bundle", "high": {...}, "low": {...}, "high_over_low": {...}} with patches_per_slide,
    seconds_per_slide and read_encode_seconds_per_slide (means) of `slides`; {"skipped": reason} when the bundle
    cannot run on them (no slide files, no teacher, an encoder that cannot be loaded here)."""
    if not slides:
        return {"skipped": "no slide files at the sites (features only): nothing to time from the file"}
    out: dict[str, Any] = {"slides": len(slides), "bundle": str(bundle_dir), "note": NOTE}
    with tempfile.TemporaryDirectory(prefix="fedslide-e2e-") as tmp:
        for resolution in ("low", "high"):
            cfg = PredictConfig.model_validate(
                {"resolution": resolution, "heatmaps": False, "progress": False, "num_workers": 0, "threads": threads}
            )
            try:
                run = predict_slides(list(slides), bundle_dir, Path(tmp) / resolution, cfg)
            except Exception as exc:  # an unusable bundle or encoder: the report says why instead of a figure
                log.warning("end-to-end cost not measured (%s): %s", resolution, exc)
                return {"skipped": f"{resolution}-res predict failed: {type(exc).__name__}: {exc}"}
            if not run.predictions:
                reasons = "; ".join(f.reason for f in run.failures)
                return {"skipped": f"{resolution}-res predict failed on every slide: {reasons}"}
            timing = json.loads((run.out_dir / "timing.json").read_text())["slides"]
            preds = run.predictions
            out[resolution] = {
                "patches_per_slide": statistics.fmean(p.patches for p in preds),
                "seconds_per_slide": statistics.fmean(timing[p.slide_id]["total_s"] for p in preds),
                "read_encode_seconds_per_slide": statistics.fmean(timing[p.slide_id]["read_encode_s"] for p in preds),
            }
    keys = ("patches_per_slide", "seconds_per_slide", "read_encode_seconds_per_slide")
    out["high_over_low"] = {k: out["high"][k] / out["low"][k] if out["low"][k] else None for k in keys}
    return out
