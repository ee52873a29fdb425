"""Low-res-only slide inference with a distilled student bundle (`fedslide predict`).

Public API:
    predict_slides(slides, bundle_or_dir, out_dir, cfg) -> PredictionRun    a folder (or list) of slides
    predict_slide(path, bundle, encoder, cfg) -> SlidePrediction            one slide, nothing written
    load_bundle(dir) / load_encoder(bundle, cfg)                             model + its verified encoder
"""

from fedslide.client.inference.model import (
    ModelDirError,
    SlideSettings,
    check_encoder,
    check_mode,
    load_bundle,
    load_encoder,
    slide_settings,
)
from fedslide.client.inference.run import (
    FAILURES_FILE,
    HEATMAP_DIR,
    PREDICTIONS_FILE,
    TIMING_FILE,
    PredictionRun,
    SlideFailure,
    predict_slides,
)
from fedslide.client.inference.slide import LowPass, SlidePrediction, SlideTiming, ZoomResult, predict_slide

__all__ = [
    "FAILURES_FILE",
    "HEATMAP_DIR",
    "PREDICTIONS_FILE",
    "TIMING_FILE",
    "LowPass",
    "ModelDirError",
    "PredictionRun",
    "SlideFailure",
    "SlidePrediction",
    "SlideSettings",
    "SlideTiming",
    "ZoomResult",
    "check_encoder",
    "check_mode",
    "load_bundle",
    "load_encoder",
    "predict_slide",
    "predict_slides",
    "slide_settings",
]
