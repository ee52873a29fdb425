"""Inference over a folder of slides: predictions.csv, heatmaps/, timing.json and failures.csv in one output folder."""

from __future__ import annotations

import csv
import json
import logging
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fedslide.client.encoders.base import PatchEncoder
from fedslide.client.inference.clinical import BRANCH_COLUMN, clinical_input
from fedslide.client.inference.model import (
    ModelDirError,
    check_encoder,
    check_mode,
    load_bundle,
    load_encoder,
    slide_settings,
)
from fedslide.client.inference.ood import OOD_COLUMNS, flagged, ood_cells, ood_lines, ood_settings
from fedslide.client.inference.qupath import OVERLAY_DIR, SlideOverlay, export_slide, tumour_class_index
from fedslide.client.inference.slide import SlidePrediction, predict_slide
from fedslide.client.slides import SlideError, discover_slides, slide_id_of
from fedslide.common.atomic import atomic_write, write_text_atomic
from fedslide.common.config.predict import PredictConfig, zoom_rule
from fedslide.common.distillation.bundle import StudentBundle
from fedslide.common.evaluation.prediction_report import write_prediction_report

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.csv"
TIMING_FILE = "timing.json"
FAILURES_FILE = "failures.csv"
HEATMAP_DIR = "heatmaps"


@dataclass
class SlideFailure:
    """A slide that could not be predicted, and why (the reason names the slide)."""

    slide_id: str
    path: str
    reason: str


@dataclass
class PredictionRun:
    """The outcome of `predict_slides`: one prediction per good slide, one failure per bad one."""

    out_dir: Path
    resolution: str
    zoom_k: int
    encoder: dict[str, Any]
    device: str = "cpu"
    zoom_threshold: float | None = None
    predictions: list[SlidePrediction] = field(default_factory=list)
    failures: list[SlideFailure] = field(default_factory=list)
    seconds: float = 0.0
    ood: dict[str, Any] | None = None  # the bundle's OOD settings (client.inference.ood); None: no OOD score
    clinical: bool = False  # slides were read by the bundle's BD model (client.inference.clinical)

    @property
    def zoom_on(self) -> bool:
        """Whether the run zoomed (top-K and/or relevance threshold)."""
        return bool(self.zoom_k) or self.zoom_threshold is not None

    @property
    def zoom_rule(self) -> str:
        """The zoom selection in words (`zoom_rule`)."""
        return zoom_rule(self.zoom_k, self.zoom_threshold)

    def zoom_totals(self) -> tuple[int, int]:
        """(high-res patches encoded by zoom, kept high-res patches of the same slides)."""
        zooms = [p.zoom for p in self.predictions if p.zoom is not None]
        return sum(z.patches_high for z in zooms), sum(z.patches_high_total for z in zooms)

    def summary_lines(self) -> list[str]:
        """Human-readable summary (printed by the CLI)."""
        preds = self.predictions
        high = self.resolution == "high"
        what = "teacher on high-res patches (reference mode)" if high else "student on low-res patches"
        lines = [f"predicted {len(preds)} slide(s), {len(self.failures)} failed, with the {what} -> {self.out_dir}"]
        if preds:
            totals = [p.timing.total_s for p in preds]
            lines.append(
                f"  end to end (slide file -> probabilities): mean {statistics.fmean(totals):.2f} s/slide, "
                f"median {statistics.median(totals):.2f} s; read+encode mean "
                f"{statistics.fmean(p.timing.read_encode_s for p in preds):.2f} s; "
                f"{statistics.fmean(p.patches for p in preds):.0f} {self.resolution}-res patches/slide"
            )
            counts = Counter(p.label for p in preds)
            lines.append("  predicted labels: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        lines += ood_lines(self.ood, preds)
        encoded, total = self.zoom_totals()
        zooms = [(p, p.zoom) for p in preds if p.zoom is not None]
        if zooms:
            saved = 1.0 - encoded / total if total else 1.0
            agree = sum(z.label == p.label for p, z in zooms)
            seconds = statistics.fmean(z.seconds for _, z in zooms)
            lines.append(
                f"  zoom {self.zoom_rule}: encoded {encoded} of {total} kept high-res patches "
                f"({saved:.1%} of the high-res encoding cost saved); zoom label agrees with the student on "
                f"{agree}/{len(zooms)} slides; zoom adds {seconds:.2f} s/slide"
            )
        return lines


def _reason(path: Path, exc: BaseException) -> str:
    return str(exc) if isinstance(exc, SlideError) else f"slide {path.name}: {type(exc).__name__}: {exc}"


def _resolve_slides(slides: Path | str | Sequence[Path | str], cfg: PredictConfig) -> list[Path]:
    if isinstance(slides, (str, Path)):
        folder = Path(slides)
        if not folder.is_dir():
            raise SlideError(f"slide folder {folder} does not exist")
        found = discover_slides(folder, cfg.slide.extensions)
        if not found:
            raise SlideError(f"no slides in {folder} (looked for extensions: {', '.join(cfg.slide.extensions)})")
        return found
    return [Path(p) for p in slides]


def predict_slides(
    slides: Path | str | Sequence[Path | str],
    bundle: StudentBundle | Path | str,
    out_dir: Path | str,
    cfg: PredictConfig,
    encoder: PatchEncoder | None = None,
    low_encoder: PatchEncoder | None = None,
) -> PredictionRun:
    """Predict every slide (a folder, or a list of files) and write the outputs into `out_dir`.

    `encoder` / `low_encoder` (built from the bundle when None) encode the high- and 5x patches; they differ
    only when the bundle's student reads a fine-tuned 5x encoder. Bad slides are recorded in failures.csv and skipped. Raises ModelDirError / BundleMismatchError /
    ConfigError for an unusable model or options (QupathExportError for a tumour class the model lacks),
    SlideError when there are no slides at all. Every slide's overlay record goes to overlays/<slide_id>.npz;
    with `cfg.geojson` its QuPath GeoJSON to qupath/<slide_id>.geojson.
    """
    start = time.perf_counter()
    if not isinstance(bundle, StudentBundle):
        bundle = load_bundle(bundle)
    check_mode(bundle, cfg)
    slide_settings(bundle)
    if cfg.geojson:
        tumour_class_index(bundle.meta.class_names, cfg.qupath.tumour_class)  # a wrong class fails before any slide
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    low_finetuned = bundle.meta.low_finetuned
    if encoder is not None:
        check_encoder(bundle, encoder)
    elif cfg.resolution == "high" or cfg.zoom or not low_finetuned:
        encoder = load_encoder(bundle, cfg)
    if not low_finetuned:
        low_encoder = encoder
    elif low_encoder is not None:
        check_encoder(bundle, low_encoder, "low")
    elif cfg.resolution == "low":
        low_encoder = load_encoder(bundle, cfg, "low")
    main = low_encoder if cfg.resolution == "low" else encoder
    if main is None:  # pragma: no cover - every branch above sets the encoder the run reads
        raise ModelDirError("no encoder for the requested resolution")
    paths = _resolve_slides(slides, cfg)
    clinical = clinical_input(bundle, cfg)  # a table of another schema is refused before any slide
    if clinical is not None:
        clinical.warn_unlisted([slide_id_of(p) for p in paths])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = PredictionRun(
        out_dir=out_dir,
        resolution=cfg.resolution,
        zoom_k=cfg.zoom_k,
        zoom_threshold=cfg.zoom_threshold,
        encoder={"name": main.name, "weights_hash": main.weights_hash, "fingerprint": main.fingerprint},
        device=str(next(iter(main.buffers()), torch.empty(0)).device),
        ood=ood_settings(bundle, cfg.resolution),
        clinical=clinical is not None,
    )
    seen: dict[str, Path] = {}
    bar = tqdm(paths, desc="predict", unit="slide", disable=not cfg.progress)
    for path in bar:
        bar.set_postfix_str(path.name)
        slide_id = slide_id_of(path)
        if slide_id in seen:
            reason = f"slide {path.name}: slide id {slide_id!r} is already taken by {seen[slide_id].name}; rename one"
            run.failures.append(SlideFailure(slide_id, str(path), reason))
            continue
        seen[slide_id] = path
        heatmap = out_dir / HEATMAP_DIR / f"{slide_id}.png" if cfg.heatmaps else None
        overlay = out_dir / OVERLAY_DIR / f"{slide_id}.npz"
        try:
            pred = predict_slide(
                path,
                bundle,
                encoder or main,
                cfg,
                heatmap_path=heatmap,
                overlay_path=overlay,
                low_encoder=low_encoder,
                keep_arrays=clinical is not None,
            )
            if clinical is not None:
                clinical.apply(pred, bundle)
                pred.low_pass = None
            if cfg.geojson:
                export_slide(SlideOverlay.load(overlay), out_dir, cfg.qupath)
            run.predictions.append(pred)
        except Exception as exc:  # one bad slide must not stop the others: record it and go on
            run.failures.append(SlideFailure(slide_id, str(path), _reason(path, exc)))
            log.error("%s", run.failures[-1].reason)
            log.debug("traceback of %s", path.name, exc_info=True)
    bar.close()
    run.seconds = time.perf_counter() - start
    write_outputs(run, list(bundle.meta.class_names), cfg)
    return run


def _fmt(value: float, digits: int = 6) -> str:
    return f"{value:.{digits}f}"


def prediction_rows(run: PredictionRun, class_names: list[str]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of predictions.csv."""
    header = ["slide_id", *(f"prob_{c}" for c in class_names), "predicted", "probability", "patches_low"]
    if run.resolution == "high":
        header.append("patches_high")
    header.append("seconds")
    if run.ood is not None:
        header += OOD_COLUMNS
    if run.clinical:
        header.append(BRANCH_COLUMN)
    if run.zoom_on:
        header += [
            *(f"zoom_prob_{c}" for c in class_names),
            "zoom_predicted",
            "zoom_regions",
            "zoom_patches_high",
            "patches_high_total",
            "zoom_cost_saved",
            "zoom_seconds",
        ]
    rows = []
    for p in run.predictions:
        row = [p.slide_id, *(_fmt(v) for v in p.probs), p.label, _fmt(p.probability), str(p.patches_low)]
        if run.resolution == "high":
            row.append(str(p.patches))
        row.append(_fmt(p.timing.total_s, 3))
        if run.ood is not None:
            row += ood_cells(p)
        if run.clinical:
            row.append(p.clinical_branch or "")
        if run.zoom_on and p.zoom is not None:
            z = p.zoom
            probs = [_fmt(v) for v in z.probs] if z.probs is not None else [""] * len(class_names)
            row += [
                *probs,
                z.label,
                str(len(z.regions)),
                str(z.patches_high),
                str(z.patches_high_total),
                _fmt(z.cost_saved, 4),
                _fmt(z.seconds, 3),
            ]
        rows.append(row)
    return header, rows


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with atomic_write(path, newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def timing_document(run: PredictionRun, cfg: PredictConfig) -> dict[str, Any]:
    """Contents of timing.json: per-slide seconds by step and a summary."""
    slides: dict[str, Any] = {}
    for p in run.predictions:
        entry: dict[str, Any] = {
            "patches": p.patches,
            "patches_low": p.patches_low,
            "patches_high_total": p.patches_high_total,
            **p.timing.to_dict(),
        }
        if p.zoom is not None:
            z = p.zoom
            entry["zoom"] = {
                "k": z.k_requested,
                "regions": len(z.regions),
                "patches_high": z.patches_high,
                "patches_high_total": z.patches_high_total,
                "cost_saved": round(z.cost_saved, 4),
                "read_encode_s": round(z.read_encode_s, 4),
                "model_s": round(z.model_s, 4),
                "seconds": round(z.seconds, 4),
            }
            entry["total_with_zoom_s"] = round(p.timing.total_s + z.seconds, 4)
        slides[p.slide_id] = entry
    summary: dict[str, Any] = {
        "slides": len(run.predictions),
        "failed": len(run.failures),
        "wall_s": round(run.seconds, 3),
    }
    if run.ood is not None:
        summary["ood"] = {**run.ood, "flagged": [p.slide_id for p in flagged(run.predictions)]}
    if run.predictions:
        for key in ("total_s", "read_encode_s", "thumbnail_tissue_s", "model_s"):
            values = [getattr(p.timing, key) for p in run.predictions]
            summary[f"{key}_mean"] = round(statistics.fmean(values), 4)
            summary[f"{key}_median"] = round(statistics.median(values), 4)
        summary["patches_mean"] = round(statistics.fmean(p.patches for p in run.predictions), 2)
    encoded, total = run.zoom_totals()
    if run.zoom_on:
        summary["zoom"] = {
            "k": run.zoom_k,
            "threshold": run.zoom_threshold,
            "rule": run.zoom_rule,
            "patches_high": encoded,
            "patches_high_total": total,
            "cost_saved": round(1.0 - encoded / total, 4) if total else 1.0,
        }
    return {
        "resolution": run.resolution,
        "definition": "total_s: from opening the slide file to the class probabilities (thumbnail, tissue, "
        "grid, patch reading + encoding, model); heatmap_s and zoom are not included in total_s",
        "encoder": run.encoder,
        "device": run.device,
        "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers,
        "torch_threads": torch.get_num_threads(),
        "slides": slides,
        "summary": summary,
    }


def write_outputs(run: PredictionRun, class_names: list[str], cfg: PredictConfig) -> None:
    """predictions.csv, timing.json, report.html and failures.csv (removed when nothing failed)."""
    header, rows = prediction_rows(run, class_names)
    _write_csv(run.out_dir / PREDICTIONS_FILE, header, rows)
    write_text_atomic(run.out_dir / TIMING_FILE, json.dumps(timing_document(run, cfg), indent=2) + "\n")
    write_prediction_report(run.out_dir)  # report.html: predictions, OOD warning, heatmaps
    failures = run.out_dir / FAILURES_FILE
    if run.failures:
        _write_csv(failures, ["slide_id", "path", "reason"], [[f.slide_id, f.path, f.reason] for f in run.failures])
    else:
        failures.unlink(missing_ok=True)
