"""Attention heatmaps of the low-res student for the evaluation report, from a slide's feature files.

The student (a `StudentBundle`) is run on the slide's low-res features (and tokens), and its
attention is drawn per instance cell (a child slot of a low patch, or a whole low patch) over the
slide thumbnail with `client.heatmaps.render_heatmap` (colour bar included). The ground-truth
lesion outline, named by the lesion's class, is added where the site has `masks/<slide_id>.png` +
`masks/masks.json` (synthetic cohorts do). A site without its slide files (features only) gets a plain canvas instead of the
thumbnail, said so in the subtitle.

In a federation this runs at the site, with the bundle the site kept, and writes into the site's
own run folder: the image never has to leave it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fedslide.client.heatmaps import InstanceMap, render_heatmap, write_heatmap
from fedslide.client.slides import SlideError, SlideReader
from fedslide.common.distillation.bundle import StudentBundle
from fedslide.common.distillation.data import SlidePair
from fedslide.common.distillation.instances import instance_coords
from fedslide.deploy.study.bundle_features import bundle_slide
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from PIL import Image

log = logging.getLogger(__name__)

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
MASK_COLOUR = "#ff00ff"


@dataclass(frozen=True)
class Thumbnail:
    """An RGB image of the whole slide and how it maps onto level-0 pixels."""

    image: np.ndarray  # [h, w, 3] uint8
    mpp: tuple[float, float]  # µm per thumbnail pixel (x, y)
    slide_mpp: float  # µm per level-0 pixel
    dims0: tuple[int, int]  # level-0 (width, height)
    real: bool  # False: a plain canvas (no slide file at the site)


def slide_file(site_dir: Path, slide_id: str) -> Path | None:
    """`<site>/slides/<slide_id>.<ext>` when present."""
    folder = Path(site_dir) / "slides"
    for ext in SLIDE_EXTENSIONS:
        path = folder / f"{slide_id}{ext}"
        if path.is_file():
            return path
    return None


def _extent0(slide: SlidePair) -> tuple[int, int]:
    coords = slide.low.coords if slide.low.coords is not None else np.zeros((1, 2))
    size = slide.low_size_level0 or 1.0
    return int(np.ceil(coords[:, 0].max() + size)), int(np.ceil(coords[:, 1].max() + size))


def thumbnail(site_dir: Path, slide: SlidePair, long_side: int, min_mpp: float) -> Thumbnail:
    """The slide's thumbnail (long side about `long_side` px, never finer than `min_mpp`), else a plain canvas."""
    attrs = slide.low.attrs
    attr_mpp = float(attrs.get("slide_mpp") or 0.0) or None
    path = slide_file(site_dir, slide.slide_id)
    if path is not None:
        try:
            with SlideReader(path, mpp_override=attr_mpp) as reader:
                long_um = max(reader.dimensions) * reader.mpp
                image, mpp = reader.thumbnail(max(reader.mpp, min_mpp, long_um / long_side))
                return Thumbnail(image, mpp, reader.mpp, tuple(reader.dimensions), True)  # type: ignore[arg-type]
        except SlideError as exc:
            log.warning("heatmap of %s: %s; drawing on a plain canvas", slide.slide_id, exc)
    slide_mpp = attr_mpp or 1.0
    dims0 = _extent0(slide)
    scale = max(dims0) / long_side  # level-0 px per canvas px
    w, h = max(1, round(dims0[0] / scale)), max(1, round(dims0[1] / scale))
    canvas = np.full((h, w, 3), 242, dtype=np.uint8)
    return Thumbnail(canvas, (dims0[0] * slide_mpp / w, dims0[1] * slide_mpp / h), slide_mpp, dims0, False)


def tumor_mask(site_dir: Path, slide_id: str) -> tuple[np.ndarray, float] | None:
    """(boolean mask, µm per mask pixel) from `masks/masks.json`, or None when the site has no mask for the slide."""
    index = Path(site_dir) / "masks" / "masks.json"
    if not index.is_file():
        return None
    try:
        doc = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("%s: unreadable (%s); no tumor outlines", index, exc)
        return None
    entry = (doc.get("slides") or {}).get(slide_id)
    if not entry:
        return None
    path = index.parent / str(entry.get("file", f"{slide_id}.png"))
    if not path.is_file():
        log.warning("%s lists %s but the file is missing", index, path.name)
        return None
    mask = np.asarray(Image.open(path).convert("L")) > 127
    return mask, float(entry.get("mpp") or doc.get("mpp") or 0.0)


def student_attention(bundle: StudentBundle, slide: SlidePair) -> tuple[np.ndarray, InstanceMap]:
    """(class probabilities [C], attention per instance cell) of the bundle's student on one slide."""
    bundle.check_features(slide.low.attrs)
    low = slide.low
    if low.coords is None:
        raise ValueError(f"{low.path}: no 'coords' dataset; a heatmap needs the patch positions")
    tokens = torch.from_numpy(np.asarray(low.tokens, dtype=np.float32)) if low.tokens is not None else None
    size = slide.low_size_level0
    probs, att, low_index, slot = bundle.predict_low(
        torch.from_numpy(np.asarray(low.features, dtype=np.float32)),
        tokens,
        torch.from_numpy(low.coords),
        low_patch_size_level0=size,
    )
    grid = bundle.meta.token_grid if bundle.meta.student_input == "tokens" else 0
    coords = instance_coords(torch.from_numpy(low.coords), low_index, slot, grid, size).numpy().astype(np.float64)
    cell = size / grid if grid > 0 else size
    return probs.numpy().astype(np.float64), InstanceMap(coords, float(cell), att.numpy().astype(np.float64))


def lesion_name(site_dir: Path, slide_id: str, fallback: str) -> str:
    """The class of the slide's masked lesion: `lesion` of its `masks/masks.json` entry (fedslide synth writes it),
    else `fallback` (the slide's label)."""
    index = Path(site_dir) / "masks" / "masks.json"
    try:
        entry = (json.loads(index.read_text()).get("slides") or {}).get(slide_id) or {}
    except (OSError, json.JSONDecodeError):
        return fallback
    return str(entry.get("lesion") or fallback)


def outline_label(mask: tuple[np.ndarray, float] | None, lesion: str) -> str:
    """The legend entry of the ground-truth outline: the lesion class it outlines, or why there is none."""
    if mask is not None and mask[0].any() and mask[1] > 0:
        return f"{lesion} (ground-truth mask)"
    return "ground-truth mask: no lesion" if mask is not None else "no ground-truth mask"


def _add_outline(fig: Figure, thumb: Thumbnail, mask: tuple[np.ndarray, float] | None, cells: str, lesion: str) -> None:
    """Lesion contour (if any) and a legend naming what is drawn (`lesion`: the outlined lesion's class)."""
    ax = fig.axes[0]
    handles: list = [Patch(facecolor="#f5a742", edgecolor="none", alpha=0.6, label=cells)]
    label = outline_label(mask, lesion)
    if mask is not None and mask[0].any() and mask[1] > 0:
        m, mpp = mask
        xs = (np.arange(m.shape[1]) + 0.5) * mpp / thumb.mpp[0]
        ys = (np.arange(m.shape[0]) + 0.5) * mpp / thumb.mpp[1]
        ax.contour(xs, ys, m.astype(np.float32), levels=[0.5], colors=[MASK_COLOUR], linewidths=1.4)
        handles.append(Line2D([], [], color=MASK_COLOUR, lw=1.6, label=label))
    else:
        handles.append(Line2D([], [], color="none", label=label))
    width, height = fig.get_figwidth() * fig.dpi, fig.get_figheight() * fig.dpi
    fig.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(12 / width, 1.0 - 48 / height),
        ncol=len(handles),
        fontsize=7,
        frameon=False,
        borderaxespad=0.0,
        borderpad=0.0,
    )


def render_slide_heatmap(
    bundle: StudentBundle,
    slide: SlidePair,
    site_dir: Path,
    out_path: Path,
    *,
    source: str,
    true_label: str,
    long_side: int = 480,
) -> dict[str, object]:
    """Write one heatmap PNG; returns what the report needs to caption it (the slide's 5x features are those the
    bundle's student reads: `bundle_slide`)."""
    slide = bundle_slide(bundle, slide, site_dir)
    probs, attention = student_attention(bundle, slide)
    thumb = thumbnail(site_dir, slide, long_side, bundle.meta.low_mpp)
    mask = tumor_mask(site_dir, slide.slide_id)
    classes: Sequence[str] = bundle.meta.class_names
    k = int(np.argmax(probs))
    m = max(len(attention.values), 1)
    values = InstanceMap(attention.coords, attention.size_level0, attention.values * m)
    cell_um = attention.size_level0 * thumb.slide_mpp
    background = "" if thumb.real else "; no slide file: plain canvas"
    fig = render_heatmap(
        thumb.image,
        thumb.mpp,
        thumb.slide_mpp,
        thumb.dims0,
        values,
        title=f"{slide.site} · {slide.slide_id}: true {true_label}, predicted {classes[k]} (p = {probs[k]:.2f})",
        subtitle=f"{source}: attention per {cell_um:.0f}-µm cell, {len(attention.values)} instances{background}",
    )
    lesion = lesion_name(site_dir, slide.slide_id, true_label)
    _add_outline(fig, thumb, mask, f"attention cell ({cell_um:.0f} µm)", lesion)
    write_heatmap(out_path, fig)
    return {
        "probs": [float(p) for p in probs],
        "predicted": classes[k],
        "instances": int(len(attention.values)),
        "cell_um": float(cell_um),
        "thumbnail": "slide" if thumb.real else "canvas",
        "mask": None if mask is None else bool(mask[0].any()),
    }


def pick_examples(
    slides: Sequence[SlidePair], classes: Sequence[str], per_class: int, site_dir: Path
) -> list[SlidePair]:
    """`per_class` slides of each class: those with a slide file first, then test-split ones, then by id."""
    out: list[SlidePair] = []
    for label in range(len(classes)):
        pool = [s for s in slides if s.label == label]
        pool.sort(key=lambda s: (slide_file(site_dir, s.slide_id) is None, s.split != "test", s.slide_id))
        out.extend(pool[:per_class])
    return out
