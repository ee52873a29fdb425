"""QuPath GeoJSON export of a prediction: tissue, kept patches with measurements, predicted tumour regions.

`predict` writes one overlay record per slide (`overlays/<slide_id>.npz`: the tissue mask, the student's
instance cells with attention and per-instance class probabilities, the slide prediction); `export_run` turns
the records of a prediction folder into `qupath/<slide_id>.geojson`, one FeatureCollection per slide, in
level-0 pixels with the origin at the slide's top-left corner (QuPath's image coordinates).

QuPath fields followed (its GeoJSON import, QuPath >= 0.4): every Feature has `properties.objectType`
("annotation", "tile" or "detection"), optional `properties.name`, `properties.classification`
({"name", "color": [r, g, b]}), `properties.measurements` (name -> number) and `properties.isLocked`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import torch
from shapely.geometry import mapping
from shapely.geometry.base import BaseGeometry
from shapely.geometry.polygon import orient

from fedslide.common.atomic import atomic_write, write_text_atomic
from fedslide.common.config.predict import QupathConfig
from fedslide.common.models.base import MILModel

OVERLAY_DIR = "overlays"
QUPATH_DIR = "qupath"
OVERLAY_VERSION = 1
TUMOUR_NAMES = ("tumor", "tumour", "cancer", "carcinoma", "malignant", "positive")
ATTENTION = "student attention"
TUMOUR_PROBABILITY = "tumour probability"


class QupathExportError(ValueError):
    """A prediction folder or overlay record cannot be exported; the message names the file and what to do."""


@torch.inference_mode()
def instance_probabilities(
    model: MILModel, instances: torch.Tensor, coords: torch.Tensor | None = None, chunk: int = 4096
) -> np.ndarray:
    """Class probabilities [M, C] of each instance read alone, as a bag of one (the model's own head)."""
    out = []
    for start in range(0, instances.shape[0], chunk):
        x = instances[start : start + chunk].float()[:, None, :]
        c = None if coords is None else coords[start : start + chunk].float()[:, None, :]
        out.append(torch.softmax(model(x, coords=c).logits.float(), dim=-1).cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 0))


def tumour_class_index(class_names: Sequence[str], wanted: str | None) -> int:
    """Index of the class drawn as tumour: `wanted`, else a tumour-like name, else the second of two classes."""
    names = [str(c) for c in class_names]
    if wanted is not None:
        if wanted not in names:
            raise QupathExportError(
                f"predict.qupath.tumour-class = {wanted!r} is not a class of the model (classes: {', '.join(names)})"
            )
        return names.index(wanted)
    for i, name in enumerate(names):
        if name.lower() in TUMOUR_NAMES:
            return i
    if len(names) == 2:
        return 1
    raise QupathExportError(
        f"no class of the model ({', '.join(names)}) looks like tumour; set predict.qupath.tumour-class to one of them"
    )


@dataclass
class SlideOverlay:
    """What the GeoJSON of one slide is built from (all coordinates in level-0 pixels)."""

    slide_id: str
    width: int
    height: int
    mpp: float
    resolution: str  # "low": student instances; "high": teacher on high-res patches
    class_names: list[str]
    probs: np.ndarray  # [C] slide probabilities
    label: str
    cell_coords: np.ndarray  # [M, 2] top-left of each instance cell
    cell_size: float  # side of each cell
    attention: np.ndarray  # [M]
    instance_probs: np.ndarray  # [M, C]
    tissue: np.ndarray  # [h, w] bool thumbnail mask
    tissue_mpp: tuple[float, float]  # (x, y) µm per mask pixel

    def save(self, path: Path) -> Path:
        """Write the record as a compressed .npz (no pickles)."""
        meta = {
            "version": OVERLAY_VERSION,
            "slide_id": self.slide_id,
            "width": self.width,
            "height": self.height,
            "mpp": self.mpp,
            "resolution": self.resolution,
            "class_names": self.class_names,
            "label": self.label,
            "cell_size": self.cell_size,
            "tissue_mpp": list(self.tissue_mpp),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, mode="wb") as fh:
            np.savez_compressed(
                fh,
                meta=np.array(json.dumps(meta)),
                probs=self.probs,
                cell_coords=self.cell_coords,
                attention=self.attention,
                instance_probs=self.instance_probs,
                tissue=np.packbits(self.tissue, axis=None),
                tissue_shape=np.array(self.tissue.shape),
            )
        return path

    @classmethod
    def load(cls, path: Path) -> SlideOverlay:
        """Read a record written by `save`; a missing key or another version is a QupathExportError."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("version") != OVERLAY_VERSION:
                    raise QupathExportError(
                        f"{path}: overlay record version {meta.get('version')!r}, this fedslide reads "
                        f"{OVERLAY_VERSION}; re-run `fedslide predict` on the slides"
                    )
                shape = tuple(int(v) for v in z["tissue_shape"])
                tissue = np.unpackbits(z["tissue"], count=int(np.prod(shape))).reshape(shape).astype(bool)
                return cls(
                    slide_id=str(meta["slide_id"]),
                    width=int(meta["width"]),
                    height=int(meta["height"]),
                    mpp=float(meta["mpp"]),
                    resolution=str(meta["resolution"]),
                    class_names=[str(c) for c in meta["class_names"]],
                    probs=np.asarray(z["probs"], dtype=np.float64),
                    label=str(meta["label"]),
                    cell_coords=np.asarray(z["cell_coords"], dtype=np.float64),
                    cell_size=float(meta["cell_size"]),
                    attention=np.asarray(z["attention"], dtype=np.float64),
                    instance_probs=np.asarray(z["instance_probs"], dtype=np.float64),
                    tissue=tissue,
                    tissue_mpp=(float(meta["tissue_mpp"][0]), float(meta["tissue_mpp"][1])),
                )
        except (KeyError, ValueError, OSError) as exc:
            if isinstance(exc, QupathExportError):
                raise
            raise QupathExportError(f"{path}: not a fedslide overlay record ({type(exc).__name__}: {exc})") from None


def tissue_polygons(
    mask: np.ndarray, mask_mpp: tuple[float, float], slide_mpp: float, simplify_px: float = 0.0
) -> list[shapely.Polygon]:
    """Connected tissue pieces of a thumbnail mask as valid polygons (holes = interior rings) in level-0 px.

    Built exactly from the mask's horizontal pixel runs (union of boxes), then optionally simplified by
    `simplify_px` mask pixels with topology kept.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return []
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    rows, cols = np.nonzero(np.diff(padded, axis=1))  # starts (+1) and ends (-1) alternate along each row
    starts, ends = cols[0::2], cols[1::2]
    y = rows[0::2].astype(np.float64)
    sx, sy = mask_mpp[0] / slide_mpp, mask_mpp[1] / slide_mpp
    boxes = shapely.box(starts * sx, y * sy, ends * sx, (y + 1) * sy)
    merged = shapely.union_all(boxes)
    if simplify_px > 0:
        merged = merged.simplify(simplify_px * max(sx, sy), preserve_topology=True)
    return _polygons(shapely.make_valid(merged))


def _polygons(geometry: BaseGeometry) -> list[shapely.Polygon]:
    """The non-empty polygons of a geometry (collections unpacked), counter-clockwise shells, largest first."""
    polys: list[shapely.Polygon] = []
    for part in shapely.get_parts(geometry):
        if isinstance(part, shapely.Polygon) and part.area > 0:
            polys.append(orient(part))
        elif isinstance(part, (shapely.MultiPolygon, shapely.GeometryCollection)):
            polys.extend(_polygons(part))
    return sorted(polys, key=lambda p: -p.area)


def tumour_regions(
    cell_coords: np.ndarray, cell_size: float, tumour_prob: np.ndarray, threshold: float
) -> list[shapely.Polygon]:
    """Connected regions (level-0 px) of the cells whose tumour probability is at least `threshold`."""
    keep = np.asarray(tumour_prob) >= threshold
    if not keep.any():
        return []
    xy = np.asarray(cell_coords, dtype=np.float64)[keep]
    merged = shapely.union_all(shapely.box(xy[:, 0], xy[:, 1], xy[:, 0] + cell_size, xy[:, 1] + cell_size))
    return _polygons(shapely.make_valid(merged))


def _feature(geometry: BaseGeometry, object_type: str, feature_id: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "Feature",
        "id": feature_id,
        "geometry": mapping(geometry),
        "properties": {"objectType": object_type, **properties},
    }


def _classification(name: str, color: Sequence[int]) -> dict[str, Any]:
    return {"name": name, "color": [int(c) for c in color]}


def slide_feature_collection(overlay: SlideOverlay, cfg: QupathConfig) -> dict[str, Any]:
    """The slide's GeoJSON FeatureCollection: tissue annotations, patch tiles/detections, tumour annotations.

    Edge patches of the grid reach past the slide's border; their cells and regions are clipped to the slide
    (cells wholly outside it are left out).
    """
    t = tumour_class_index(overlay.class_names, cfg.tumour_class)
    tumour_name = overlay.class_names[t]
    ns = uuid.uuid5(uuid.NAMESPACE_URL, f"fedslide:{overlay.slide_id}")
    features: list[dict[str, Any]] = []
    slide_measurements = {
        f"slide probability {c}": round(float(p), 6) for c, p in zip(overlay.class_names, overlay.probs)
    }
    tissue = tissue_polygons(overlay.tissue, overlay.tissue_mpp, overlay.mpp, cfg.simplify_px)
    for i, poly in enumerate(tissue):
        features.append(
            _feature(
                poly,
                "annotation",
                str(uuid.uuid5(ns, f"tissue/{i}")),
                {
                    "name": f"Tissue {i + 1}",
                    "classification": _classification("Tissue", cfg.tissue_color),
                    "isLocked": True,
                    "measurements": {"holes": len(poly.interiors), **slide_measurements},
                },
            )
        )
    tumour_prob = overlay.instance_probs[:, t] if overlay.instance_probs.size else np.zeros(len(overlay.attention))
    size, w, h = overlay.cell_size, overlay.width, overlay.height
    for i, ((x, y), att, p) in enumerate(zip(overlay.cell_coords, overlay.attention, tumour_prob)):
        if x >= w or y >= h:  # a token cell wholly past the slide's edge
            continue
        features.append(
            _feature(
                shapely.box(float(x), float(y), min(float(x) + size, w), min(float(y) + size, h)),
                cfg.patch_object,
                str(uuid.uuid5(ns, f"patch/{i}")),
                {
                    "isLocked": True,
                    "measurements": {ATTENTION: round(float(att), 8), TUMOUR_PROBABILITY: round(float(p), 6)},
                },
            )
        )
    frame = shapely.box(0, 0, w, h)
    regions = tumour_regions(overlay.cell_coords, size, tumour_prob, cfg.region_threshold)
    for i, poly in enumerate(_polygons(shapely.intersection(shapely.union_all(regions), frame)) if regions else []):
        inside = _cells_inside(overlay.cell_coords, size, poly)
        features.append(
            _feature(
                poly,
                "annotation",
                str(uuid.uuid5(ns, f"tumour/{i}")),
                {
                    "name": f"Predicted {tumour_name} {i + 1}",
                    "classification": _classification(tumour_name, cfg.tumour_color),
                    "isLocked": False,
                    "measurements": {
                        "patches": int(inside.sum()),
                        f"mean {TUMOUR_PROBABILITY}": round(float(tumour_prob[inside].mean()), 6),
                        f"{ATTENTION} sum": round(float(overlay.attention[inside].sum()), 8),
                    },
                },
            )
        )
    return {
        "type": "FeatureCollection",
        "features": features,
        "properties": {
            "slide_id": overlay.slide_id,
            "predicted": overlay.label,
            "resolution": overlay.resolution,
            "coordinates": "level-0 pixels, origin top-left",
            "width": overlay.width,
            "height": overlay.height,
            "mpp": overlay.mpp,
        },
    }


def _cells_inside(coords: np.ndarray, size: float, region: shapely.Polygon) -> np.ndarray:
    centres = shapely.points(coords[:, 0] + size / 2, coords[:, 1] + size / 2)
    return np.asarray(shapely.contains(region, centres), dtype=bool)


def write_geojson(path: Path, collection: dict[str, Any]) -> Path:
    """Write one FeatureCollection (compact JSON, QuPath reads .geojson)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(collection, separators=(",", ":")) + "\n")
    return path


def export_slide(overlay: SlideOverlay, out_dir: Path, cfg: QupathConfig) -> Path:
    """Write `out_dir/qupath/<slide_id>.geojson` from an overlay record."""
    return write_geojson(out_dir / QUPATH_DIR / f"{overlay.slide_id}.geojson", slide_feature_collection(overlay, cfg))


def export_run(run_dir: Path | str, cfg: QupathConfig, out_dir: Path | str | None = None) -> list[Path]:
    """GeoJSON for every overlay record of a `fedslide predict` output folder (into `out_dir`, default the same)."""
    run_dir = Path(run_dir)
    records = sorted((run_dir / OVERLAY_DIR).glob("*.npz"))
    if not records:
        raise QupathExportError(
            f"{run_dir}: no overlay records in {run_dir / OVERLAY_DIR} — give the output folder of "
            "`fedslide predict` (folders written before the QuPath export existed need `fedslide predict` again)"
        )
    target = Path(out_dir) if out_dir is not None else run_dir
    return [export_slide(SlideOverlay.load(p), target, cfg) for p in records]
