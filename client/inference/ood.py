"""The out-of-distribution part of `fedslide predict`'s outputs: settings, CSV columns and the console warning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedslide.client.inference.slide import SlidePrediction
from fedslide.common.distillation.bundle import StudentBundle

OOD_COLUMNS = ["ood_score", "ood_flag"]


def ood_settings(bundle: StudentBundle, resolution: str) -> dict[str, Any] | None:
    """The bundle's OOD facts (threshold, quantile, training and validation slides) for a low-res run; None when
    the bundle has no OOD statistics or the run reads high-res patches (the score is of 5x features)."""
    o = bundle.ood
    if o is None or resolution != "low":
        return None
    return {"threshold": o.threshold, "quantile": o.quantile, "slides": o.slides, "val_slides": o.val_slides}


def ood_cells(pred: SlidePrediction) -> list[str]:
    """The slide's `ood_score` (4 decimals; empty when unscored) and `ood_flag` (0/1) cells."""
    return ["" if pred.ood_score is None else f"{pred.ood_score:.4f}", str(int(pred.ood_flag))]


def flagged(predictions: Sequence[SlidePrediction]) -> list[SlidePrediction]:
    """The flagged predictions, by slide id."""
    return sorted((p for p in predictions if p.ood_flag), key=lambda p: p.slide_id)


def ood_lines(settings: dict[str, Any] | None, predictions: Sequence[SlidePrediction]) -> list[str]:
    """The console's OOD lines: a WARNING naming the flagged slides, or that none was (empty without OOD stats)."""
    scores = [p.ood_score for p in predictions if p.ood_score is not None]
    if settings is None or not scores:
        return []
    threshold = settings.get("threshold")
    if threshold is None:
        return [f"  OOD scores up to {max(scores):.2f} (no flag: the bundle has no threshold, it had no val slides)"]
    bad = flagged(predictions)
    if not bad:
        return [f"  OOD: no slide is unlike the training slides (every score <= threshold {threshold:.2f})"]
    names = ", ".join(f"{p.slide_id} ({p.ood_score:.2f})" for p in bad)
    return [
        f"  WARNING: {len(bad)} of {len(scores)} slide(s) look unlike the slides this model was trained on "
        f"(OOD score > threshold {threshold:.2f}); their predictions may be unreliable: {names}"
    ]
