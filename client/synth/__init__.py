"""Synthetic multi-site cohorts of pyramidal H&E-like whole-slide images (`fedslide synth`).

Public API:
    generate_cohort(cfg) -> list[Path]                    the whole cohort (see common.config.synth)
    write_slide(path, width_um, height_um, mpp, style, seed, ...) -> Path
    write_pyramidal_tiff(path, width, height, mpp, style, tile_fn, downsamples) -> Path
    make_slide_model(...) / render_region(model, mpp, x, y, w, h) / tumor_mask(fields, mpp)
"""

from fedslide.client.synth.cohort import SCANNER_STYLES, generate_cohort, plan_site
from fedslide.client.synth.fields import tissue_mask, tumor_mask
from fedslide.client.synth.slide import make_slide_model, write_slide, write_slide_model
from fedslide.client.synth.stains import Stain, perturb_stain
from fedslide.client.synth.tiff_writer import default_downsamples, write_pyramidal_tiff
from fedslide.client.synth.tissue_render import SlideModel, render_region

__all__ = [
    "SCANNER_STYLES",
    "SlideModel",
    "Stain",
    "default_downsamples",
    "generate_cohort",
    "make_slide_model",
    "perturb_stain",
    "plan_site",
    "render_region",
    "tissue_mask",
    "tumor_mask",
    "write_pyramidal_tiff",
    "write_slide",
    "write_slide_model",
]
