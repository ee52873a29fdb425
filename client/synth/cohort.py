"""A synthetic multi-site cohort: sites with their scanner and stain, labelled slides, splits, masks."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from fedslide.common import __version__
from fedslide.common.config.base import ConfigError
from fedslide.common.config.synth import SynthConfig
from fedslide.client.synth.fields import tumor_mask
from fedslide.client.synth.slide import level0_size, make_slide_model, write_slide_model
from fedslide.client.synth.stains import Stain, perturb_stain
from fedslide.client.synth.subtypes import is_lesion, lesion_appearance, plan_labels, task_labels
from fedslide.client.synth.tiff_writer import TiffStyle, objective_power

log = logging.getLogger(__name__)

LABELS = task_labels("binary")
SPLITS = ("train", "val", "test")
_OWN_FILES = ("labels.csv", "cohort.json", "clinical.csv")
_SETTINGS_NOT_AFFECTING_OUTPUT = ("out-dir", "workers", "overwrite", "progress")


@dataclass(frozen=True)
class ScannerStyle:
    """How a site's scanner writes slides."""

    name: str
    tiff_style: TiffStyle
    mpp: float
    extension: str

    @property
    def objective_power(self) -> float | None:
        """Nominal magnification recorded in the file (None when the file records none)."""
        return None if self.tiff_style == "plain" else objective_power(self.mpp)


SCANNER_STYLES: dict[str, ScannerStyle] = {
    s.name: s
    for s in (
        ScannerStyle("aperio-40x", "aperio", 0.25, ".svs"),
        ScannerStyle("aperio-20x", "aperio", 0.5, ".svs"),
        ScannerStyle("generic-40x", "generic", 0.25, ".tif"),
        ScannerStyle("generic-20x", "generic", 0.5, ".tif"),
        ScannerStyle("plain-20x", "plain", 0.5, ".tif"),
    )
}


@dataclass(frozen=True)
class SlidePlan:
    """Everything that decides one slide's content and where it goes."""

    slide_id: str
    label: str
    split: str
    patient_id: str
    width_um: float
    height_um: float
    seed: int
    tumor_fraction: float | None
    pen: bool
    holes: bool
    stain: Stain


@dataclass(frozen=True)
class SitePlan:
    """One site: its scanner, stain and slides."""

    index: int
    name: str
    scanner: ScannerStyle
    stain: Stain
    stain_shift: float
    slides: tuple[SlidePlan, ...]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def _slide_seed(seed: int, site: int, slide: int) -> int:
    return int(np.random.SeedSequence([seed, site, slide, 7]).generate_state(1, np.uint64)[0])


def _pick(count: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean flags: exactly round(fraction · count) of `count` items, at random."""
    flags = np.zeros(count, dtype=bool)
    flags[rng.permutation(count)[: int(round(fraction * count))]] = True
    return flags


def assign_patients_and_splits(
    labels: list[str],
    split_fractions: tuple[float, float, float],
    paired_fraction: float,
    rng: np.random.Generator,
) -> tuple[list[int], list[str]]:
    """Patient index and split per slide: splits stratified by label and grouped by patient.

    Some patients (about `paired_fraction` of the slides) have two slides of the same label; a
    patient's slides share a split. With at least four slides every class gets a test slide;
    with three or more slides of a class it also gets a validation slide (when val share > 0).
    """
    total = len(labels)
    patients = [-1] * total
    splits = [""] * total
    next_patient = 0
    groups: list[tuple[str, list[list[int]]]] = []
    for label in sorted(set(labels)):
        idx = [i for i in rng.permutation(total).tolist() if labels[i] == label]
        n = len(idx)
        n_pairs = min(int(n * paired_fraction / 2), max(0, n - 3))
        members = [idx[2 * k : 2 * k + 2] for k in range(n_pairs)] + [[i] for i in idx[2 * n_pairs :]]
        groups.append((label, members))
    for label, members in groups:
        n = sum(len(m) for m in members)
        want_test = round(split_fractions[2] * n)
        want_val = round(split_fractions[1] * n)
        if total >= 4 and split_fractions[2] > 0:
            want_test = max(want_test, 1)
        if n >= 3 and split_fractions[1] > 0:
            want_val = max(want_val, 1)
        while want_test + want_val >= n and (want_val > 0 or want_test > 0):
            if want_val > 0:
                want_val -= 1
            else:
                want_test -= 1
        singles = [m for m in members if len(m) == 1]
        pairs = [m for m in members if len(m) > 1]
        got = {"test": 0, "val": 0}
        for patient in singles + pairs:
            if got["test"] < want_test:
                split = "test"
            elif got["val"] < want_val:
                split = "val"
            else:
                split = "train"
            if split in got:
                got[split] += len(patient)
            for i in patient:
                patients[i] = next_patient
                splits[i] = split
            next_patient += 1
    # number patients in slide order, so ids do not reveal labels
    order: dict[int, int] = {}
    for p in patients:
        order.setdefault(p, len(order))
    return [order[p] for p in patients], splits


def plan_site(cfg: SynthConfig, index: int) -> SitePlan:
    """Draw one site's scanner, stain and slide list (labels, splits, patients, artefacts, sizes)."""
    name = cfg.site_name(index)
    scanner = SCANNER_STYLES[cfg.scanner_style(index)]
    shift = cfg.stain_shift * (cfg.strong_shift_factor if index == cfg.strong_shift_site else 1.0)
    site_stain = perturb_stain(Stain(), shift, _rng(cfg.seed, index, 1))
    rng = _rng(cfg.seed, index, 2)
    k = cfg.slides_per_site
    labels = plan_labels(cfg.task, k)
    labels = [labels[i] for i in rng.permutation(k)]
    pens = _pick(k, cfg.pen_mark_fraction, rng)
    holes = _pick(k, cfg.hole_fraction, rng)
    lo, hi = cfg.slide_size_um
    sizes = rng.uniform(lo, hi, size=(k, 2))
    tumor_fractions = rng.uniform(*cfg.tumor_area_fraction, size=k)
    patients, splits = assign_patients_and_splits(labels, cfg.split_fractions, cfg.paired_patient_fraction, rng)
    digits = max(3, len(str(k)))
    slides = []
    for j in range(k):
        seed = _slide_seed(cfg.seed, index, j)
        slides.append(
            SlidePlan(
                slide_id=f"{name}_slide{j + 1:0{digits}d}",
                label=labels[j],
                split=splits[j],
                patient_id=f"{name}_patient{patients[j] + 1:0{digits}d}",
                width_um=float(sizes[j, 0]),
                height_um=float(sizes[j, 1]),
                seed=seed,
                tumor_fraction=float(tumor_fractions[j]) if is_lesion(labels[j]) else None,
                pen=bool(pens[j]),
                holes=bool(holes[j]),
                stain=perturb_stain(site_stain, cfg.slide_stain_jitter, _rng(seed, 3)),
            )
        )
    return SitePlan(index, name, scanner, site_stain, shift, tuple(slides))


@dataclass(frozen=True)
class _Job:
    """One slide to render, with where and how to write it (picklable for worker processes)."""

    plan: SlidePlan
    scanner: ScannerStyle
    slide_path: Path
    mask_path: Path
    mask_mpp: float
    tile: int
    compression: str
    compression_level: int
    progress: bool


def _make_slide(job: _Job) -> dict[str, Any]:
    """Render one slide (unless its file already exists) and its mask; return its record."""
    start = time.perf_counter()
    plan, scanner = job.plan, job.scanner
    width, height = level0_size(plan.width_um, plan.height_um, scanner.mpp, scanner.tiff_style)
    model = make_slide_model(
        width * scanner.mpp,
        height * scanner.mpp,
        plan.seed,
        tumor=plan.tumor_fraction is not None,
        tumor_fraction=plan.tumor_fraction or 0.25,
        pen=plan.pen,
        holes=plan.holes,
        stain=plan.stain,
    )
    if is_lesion(plan.label):  # each lesion class has its own look (subtypes.py)
        model = dataclasses.replace(model, appearance=lesion_appearance(plan.label))
    written = not job.slide_path.exists()
    if written:
        write_slide_model(
            job.slide_path,
            model,
            scanner.mpp,
            scanner.tiff_style,
            width=width,
            height=height,
            tile=job.tile,
            compression=job.compression,  # type: ignore[arg-type]
            compression_level=job.compression_level,
            progress=job.progress,
        )
    mask = tumor_mask(model.fields, job.mask_mpp)
    job.mask_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((mask * 255).astype(np.uint8)).save(job.mask_path, optimize=True)
    return {
        "slide_id": plan.slide_id,
        "label": plan.label,
        "split": plan.split,
        "patient_id": plan.patient_id,
        "file": f"slides/{job.slide_path.name}",
        "width": width,
        "height": height,
        "width_um": round(width * scanner.mpp, 3),
        "height_um": round(height * scanner.mpp, 3),
        "mask_width": int(mask.shape[1]),
        "mask_height": int(mask.shape[0]),
        "tumor_mask_pixels": int(mask.sum()),
        "tissue_fraction": round(model.fields.tissue_fraction(), 4),
        "tumor_area_fraction": round(model.fields.tumor_fraction(), 4),
        "pen_mark": model.fields.ink_colour,
        "holes": plan.holes,
        "seed": plan.seed,
        "stain": plan.stain.to_dict(),
        "written": written,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _generation_settings(cfg: SynthConfig) -> dict[str, Any]:
    """The settings that decide the cohort's content (not where or how fast it is written)."""
    data = cfg.to_toml_dict()
    for key in _SETTINGS_NOT_AFFECTING_OUTPUT:
        data.pop(key, None)
    if data.get("task") == "binary":  # binary cohorts record what they always did (they are unchanged)
        data.pop("task")
    if data.get("clinical-missingness") is None:  # cohorts made before the clinical tables keep matching
        data.pop("clinical-missingness", None)
    return data


def _prepare_site_dir(site_dir: Path, cfg: SynthConfig) -> None:
    """Make the site folder ready: empty, or holding this very cohort (kept and completed), or cleared."""
    record = site_dir / "cohort.json"
    if not site_dir.exists() or not any(site_dir.iterdir()):
        return
    same = False
    if record.is_file():
        try:
            same = json.loads(record.read_text()).get("settings") == _generation_settings(cfg)
        except (OSError, json.JSONDecodeError):
            same = False
    if same and not cfg.overwrite:
        for partial in (site_dir / "slides").glob("*.partial"):
            partial.unlink()
        return
    if not cfg.overwrite:
        raise ConfigError(
            f"{site_dir} already holds other data (a cohort made with different settings, or other files); "
            "choose another out-dir or set overwrite = true (--set overwrite=true) to replace the synthetic files"
        )
    for pattern in ("slides/*.svs", "slides/*.tif", "slides/*.partial", "masks/*.png", "masks/masks.json"):
        for path in site_dir.glob(pattern):
            path.unlink()
    for name in _OWN_FILES:
        (site_dir / name).unlink(missing_ok=True)
    others = sorted(p.name for p in site_dir.iterdir() if p.name not in ("slides", "masks"))
    if others:
        log.warning("%s: replaced the synthetic slides; left %s alone, which may now be stale", site_dir, others)


def _write_labels(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "label", "split", "patient_id"])
        for r in records:
            writer.writerow([r["slide_id"], r["label"], r["split"], r["patient_id"]])


def _write_site_files(site_dir: Path, site: SitePlan, cfg: SynthConfig, records: list[dict[str, Any]]) -> None:
    records = sorted(records, key=lambda r: r["slide_id"])
    _write_labels(site_dir / "labels.csv", records)
    if cfg.clinical_missingness:
        from fedslide.client.synth.clinical import write_site_clinical

        patients = dict.fromkeys(r["patient_id"] for r in records)  # a patient's slides share its label
        label_of = {r["patient_id"]: r["label"] for r in records}
        share = cfg.clinical_missingness[(site.index - 1) % len(cfg.clinical_missingness)]
        labels = [label_of[pid] for pid in patients]
        classes = task_labels(cfg.task)  # severity order: the clinical signal grows with the class index
        write_site_clinical(site_dir, list(patients), labels, share, (cfg.seed, site.index, 8), classes)
    masks = {
        "mpp": cfg.mask_mpp,
        "description": "ground-truth lesion masks (255 = lesion within tissue, of the class named by `lesion`); "
        "pixel (0, 0) is the slide's top-left corner, each pixel covers mpp × mpp µm; level-0 size and mpp per "
        "slide below",
        "slides": {
            r["slide_id"]: {
                "file": f"{r['slide_id']}.png",
                "width": r["mask_width"],
                "height": r["mask_height"],
                "level0_width": r["width"],
                "level0_height": r["height"],
                "level0_mpp": site.scanner.mpp,
                "tumor_pixels": r["tumor_mask_pixels"],
                "lesion": r["label"] if r["tumor_mask_pixels"] else None,  # the class the masked lesion shows
            }
            for r in records
        },
    }
    (site_dir / "masks" / "masks.json").write_text(json.dumps(masks, indent=2) + "\n")
    meta = {
        "generator": f"fedslide synth {__version__}",
        "site": site.name,
        "site_index": site.index,
        "scanner_style": site.scanner.name,
        "format": site.scanner.tiff_style,
        "extension": site.scanner.extension,
        "mpp": site.scanner.mpp,
        "mpp_recorded": site.scanner.tiff_style != "plain",
        "objective_power": site.scanner.objective_power,
        "stain": site.stain.to_dict(),
        "stain_shift": site.stain_shift,
        "seed": cfg.seed,
        "labels": {label: sum(r["label"] == label for r in records) for label in task_labels(cfg.task)},
        "splits": {split: sum(r["split"] == split for r in records) for split in SPLITS},
        "settings": _generation_settings(cfg),
        "slides": [{k: v for k, v in r.items() if k not in ("written", "seconds")} for r in records],
    }
    (site_dir / "cohort.json").write_text(json.dumps(meta, indent=2) + "\n")


def _run_jobs(jobs: list[_Job], workers: int, progress: bool) -> Iterable[dict[str, Any]]:
    bar = tqdm(total=len(jobs), desc="slides", unit="slide", disable=not progress)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield _make_slide(job)
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
                for record in pool.map(_make_slide, jobs):
                    yield record
                    bar.update()
    finally:
        bar.close()


def generate_cohort(cfg: SynthConfig, on_slide: Callable[[dict[str, Any]], None] | None = None) -> list[Path]:
    """Write the cohort described by `cfg`; returns the site folders.

    Layout per site: slides/<slide_id>.svs|.tif, labels.csv (slide_id,label,split,patient_id),
    masks/<slide_id>.png with masks/masks.json, cohort.json. A folder already holding the same
    cohort is completed rather than redone; other content is refused unless cfg.overwrite.
    """
    sites = [plan_site(cfg, i) for i in range(1, cfg.sites + 1)]
    site_dirs = [cfg.out_dir / site.name for site in sites]
    for site_dir in site_dirs:
        _prepare_site_dir(site_dir, cfg)
    jobs: list[_Job] = []
    for site, site_dir in zip(sites, site_dirs):
        (site_dir / "slides").mkdir(parents=True, exist_ok=True)
        (site_dir / "masks").mkdir(parents=True, exist_ok=True)
        for plan in site.slides:
            jobs.append(
                _Job(
                    plan=plan,
                    scanner=site.scanner,
                    slide_path=site_dir / "slides" / f"{plan.slide_id}{site.scanner.extension}",
                    mask_path=site_dir / "masks" / f"{plan.slide_id}.png",
                    mask_mpp=cfg.mask_mpp,
                    tile=cfg.tile_size,
                    compression=cfg.compression,
                    compression_level=cfg.compression_level,
                    progress=cfg.progress and cfg.workers == 1,
                )
            )
    records: dict[str, list[dict[str, Any]]] = {site.name: [] for site in sites}
    site_of = {plan.slide_id: site.name for site in sites for plan in site.slides}
    for record in _run_jobs(jobs, cfg.workers, cfg.progress):
        records[site_of[record["slide_id"]]].append(record)
        if on_slide is not None:
            on_slide(record)
    for site, site_dir in zip(sites, site_dirs):
        _write_site_files(site_dir, site, cfg, records[site.name])
    return site_dirs
