"""The preprocessing job of one site: tissue → paired tiling → encoding → feature files, resumable."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fedslide.client.encoders.base import PatchEncoder
from fedslide.client.encoders.registry import build_encoder
from fedslide.client.encoding import encode_grid
from fedslide.client.patch_loader import RegionDataset
from fedslide.client.qc import write_qc_image
from fedslide.client.slide_claims import CLAIMS_DIR, claim_store
from fedslide.client.slides import SlideError, SlideReader, discover_slides, slide_id_of
from fedslide.client.stain_normalize import STAIN_ATTR, build_stain_normalizer
from fedslide.client.tiling import PairedGrid, paired_grid
from fedslide.client.tissue import segment_tissue
from fedslide.common.atomic import TEMP_SUFFIX, atomic_write
from fedslide.common.config.preprocess import PreprocessConfig
from fedslide.common.device import resolve_device
from fedslide.common.feature_layouts import clam_paths, write_clam
from fedslide.common.features import (
    FeatureMeta,
    FeatureWriter,
    config_hash,
    feature_path,
    is_complete,
    preprocess_attrs,
    read_feature_file,
)

log = logging.getLogger(__name__)

FAILURES_FILE = "failures.csv"
SUMMARY_FILE = "summary.json"


@dataclass
class SlideResult:
    """What happened to one slide."""

    slide_id: str
    path: str
    status: str  # "done", "skipped" or "failed"
    patches_low: int = 0
    patches_high: int = 0
    seconds: float = 0.0
    reason: str = ""
    stain_fallback_low: int = 0  # tiles left un-normalised (too little stain, or the Macenko fit failed)
    stain_fallback_high: int = 0


@dataclass
class SiteSummary:
    """Outcome of one site's preprocessing run."""

    site_dir: str
    encoder: str
    slides: list[SlideResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[SlideResult]:
        return [s for s in self.slides if s.status == "failed"]

    def count(self, status: str) -> int:
        return sum(s.status == status for s in self.slides)

    def patches(self, resolution: str) -> int:
        return sum(getattr(s, f"patches_{resolution}") for s in self.slides)

    def to_dict(self) -> dict:
        return {
            "site_dir": self.site_dir,
            "encoder": self.encoder,
            "seconds": round(self.seconds, 3),
            "done": self.count("done"),
            "skipped": self.count("skipped"),
            "failed": self.count("failed"),
            "patches_low": self.patches("low"),
            "patches_high": self.patches("high"),
            "slides": [asdict(s) for s in self.slides],
        }


class SitePreprocessor:
    """Runs preprocessing over the slides of one site directory with one loaded encoder."""

    def __init__(self, cfg: PreprocessConfig, encoder: PatchEncoder | None = None):
        self.cfg = cfg
        if cfg.encoder.threads:
            torch.set_num_threads(cfg.encoder.threads)
        self.device = resolve_device(cfg.encoder.device)
        self.encoder = (encoder or build_encoder(cfg.encoder)).to(self.device).eval()
        if self.device.type == "cuda":
            self.encoder = self.encoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch stubs omit Module.to(memory_format=)
        self.stain = build_stain_normalizer(cfg)
        self.token_grid = cfg.tiling.ratio if (cfg.encoder.write_tokens and self.encoder.has_feature_map) else 0

    @property
    def resolutions(self) -> tuple[str, ...]:
        return {"both": ("low", "high"), "low": ("low",), "high": ("high",)}[self.cfg.resolutions]

    def settings_hash(self, resolution: str) -> str:
        """Hash of everything that decides the contents of one resolution's feature file."""
        c = self.cfg
        return config_hash(
            {
                "resolution": resolution,
                "slide": c.slide.model_dump(mode="json", exclude={"extensions"}),
                "tissue": c.tissue.model_dump(mode="json"),
                "tiling": c.tiling.model_dump(mode="json"),
                "encoder": self.encoder.identity(),
                "tokens": self.token_grid if resolution == "low" else 0,
                **({"stain": self.stain.identity()} if self.stain is not None else {}),
            }
        )

    def run(self, site_dir: Path) -> SiteSummary:
        """Process every slide under `<site_dir>/slides`; failures are recorded, never fatal."""
        site_dir = Path(site_dir)
        start = time.perf_counter()
        out_dir = site_dir / "features" / self.encoder.name
        slides = discover_slides(site_dir / "slides", self.cfg.slide.extensions)
        summary = SiteSummary(site_dir=str(site_dir), encoder=self.encoder.name)
        if not slides:
            raise SlideError(
                f"no slides in {site_dir / 'slides'} (looked for extensions: {', '.join(self.cfg.slide.extensions)})"
            )
        live = claim_store(site_dir, self.encoder.name, self.cfg.claim_lease_s).live_claims()
        if live:
            held = ", ".join(f"{sid} ({c.owner} on {c.host})" for sid, c in sorted(live.items())[:5])
            raise SlideError(
                f"{len(live)} slide(s) of {site_dir} are being written by cluster workers now (live claims under "
                f"{out_dir / CLAIMS_DIR}: {held}); wait for that job, rerun it with executor = 'ray', or wait "
                f"claim-lease-s = {self.cfg.claim_lease_s:g} s after it died"
            )
        for res in self.resolutions:
            for stale in (out_dir / res).glob(f"*.h5*{TEMP_SUFFIX}"):  # left by a killed run
                stale.unlink()
        bar = tqdm(slides, desc=f"slides {site_dir.name}", unit="slide", disable=not self.cfg.progress)
        for path in bar:
            bar.set_postfix_str(path.name)
            summary.slides.append(self.process_slide(path, site_dir))
        bar.close()
        summary.seconds = time.perf_counter() - start
        self._write_reports(out_dir, summary)
        return summary

    def process_slide(self, path: Path, site_dir: Path, before_commit: Callable[[], None] | None = None) -> SlideResult:
        """Preprocess one slide; return its result (status 'failed' with the reason on bad input).

        `before_commit` runs after encoding, before the feature files are renamed into place; raising there
        discards them (a worker that lost its slide claim).
        """
        slide_id = slide_id_of(path)
        t0 = time.perf_counter()
        targets = {r: feature_path(site_dir, self.encoder.name, r, slide_id) for r in self.resolutions}
        hashes = {r: self.settings_hash(r) for r in self.resolutions}
        todo = [r for r in self.resolutions if self.cfg.overwrite or not is_complete(targets[r], hashes[r])]
        if not todo:
            self._write_clam(site_dir, slide_id, targets, [])
            return SlideResult(slide_id, str(path), "skipped", seconds=time.perf_counter() - t0)
        try:
            with SlideReader(path, self.cfg.slide.mpp_override, self.cfg.slide.mpp_tolerance) as slide:
                thumb, thumb_mpp = slide.thumbnail(self.cfg.tissue.thumbnail_mpp)
                tissue = segment_tissue(thumb, float(np.mean(thumb_mpp)), self.cfg.tissue)
                grid = paired_grid(*slide.dimensions, slide.mpp, self.cfg.tiling, tissue, thumb_mpp)
                if len(grid.low_coords) == 0 or ("high" in todo and len(grid.high_coords) == 0):
                    raise SlideError(
                        f"slide {path.name}: no tissue found (tissue covers {tissue.mean():.1%} of the thumbnail; "
                        f"thresholds tiling.min-tissue-low={self.cfg.tiling.min_tissue_low}, "
                        f"tiling.min-tissue-high={self.cfg.tiling.min_tissue_high})"
                    )
                counts = self._encode_slide(slide, grid, todo, targets, hashes, before_commit)
                self._write_clam(site_dir, slide_id, targets, todo)
                if self.cfg.qc_images:
                    write_qc_image(site_dir / "qc" / f"{slide_id}.png", slide, tissue, grid)
        except Exception as exc:  # one bad slide must not stop the site: record it and go on
            reason = str(exc) if isinstance(exc, SlideError) else f"slide {path.name}: {type(exc).__name__}: {exc}"
            log.error("%s", reason)
            log.debug("traceback of %s", path.name, exc_info=True)
            return SlideResult(slide_id, str(path), "failed", seconds=time.perf_counter() - t0, reason=reason)
        return SlideResult(
            slide_id,
            str(path),
            "done",
            patches_low=counts.get("low", 0),
            patches_high=counts.get("high", 0),
            seconds=time.perf_counter() - t0,
            stain_fallback_low=counts.get("stain_fallback_low", 0),
            stain_fallback_high=counts.get("stain_fallback_high", 0),
        )

    def _write_clam(self, site_dir: Path, slide_id: str, targets: dict[str, Path], fresh: list[str]) -> None:
        """With `clam-layout`, copy the slide's feature files into CLAM's layout (those just written, and any
        whose CLAM copy is missing)."""
        if not self.cfg.clam_layout:
            return
        for res, target in targets.items():
            clam_dir = site_dir / "clam" / self.encoder.name / res
            if res in fresh or not all(p.is_file() for p in clam_paths(clam_dir, slide_id)):
                write_clam(read_feature_file(target), clam_dir, slide_id)

    def _meta(self, slide: SlideReader, resolution: str, grid: PairedGrid, chash: str) -> FeatureMeta:
        t = self.cfg.tiling
        mpp = t.low_mpp if resolution == "low" else t.high_mpp
        size = t.low_patch_size if resolution == "low" else t.high_patch_size
        size0 = grid.low_size_level0 if resolution == "low" else grid.high_size_level0
        return FeatureMeta(
            slide_id=slide.slide_id,
            resolution=resolution,
            encoder_name=self.encoder.name,
            encoder_weights_hash=self.encoder.weights_hash,
            encoder_dim=self.encoder.dim,
            patch_size=size,
            patch_size_level0=int(round(size0)),
            target_mpp=mpp,
            target_magnification=10.0 / mpp,
            slide_mpp=slide.mpp,
            level0_magnification=slide.resolution.magnification,
            config_hash=chash,
            token_grid=self.token_grid if resolution == "low" else 0,
            extra={
                "child_grid": grid.ratio,
                "encoder_fingerprint": self.encoder.fingerprint,
                "mpp_source": slide.resolution.source,
                "patch_size_level0_exact": float(size0),
                "slide_vendor": slide.vendor,
                STAIN_ATTR: json.dumps(self.stain.identity() if self.stain else {"method": "none"}, sort_keys=True),
                **preprocess_attrs(self.cfg.tissue.to_toml_dict(), t.to_toml_dict()),
            },
        )

    def _encode_slide(
        self,
        slide: SlideReader,
        grid: PairedGrid,
        todo: list[str],
        targets: dict[str, Path],
        hashes: dict[str, str],
        before_commit: Callable[[], None] | None = None,
    ) -> dict[str, int]:
        t = self.cfg.tiling
        passes = [todo] if t.low_patch_size == t.high_patch_size else [[r] for r in todo]
        total = (len(grid.low_coords) if "low" in todo else 0) + (len(grid.high_coords) if "high" in todo else 0)
        with contextlib.ExitStack() as stack:
            writers = {
                r: stack.enter_context(
                    FeatureWriter(
                        targets[r],
                        self._meta(slide, r, grid, hashes[r]),
                        with_parent=(r == "high"),
                        with_tokens=(r == "low" and self.token_grid > 0),
                    )
                )
                for r in todo
            }
            bar = tqdm(
                total=total, desc=f"  {slide.slide_id}", unit="patch", leave=False, disable=not self.cfg.progress
            )
            fallbacks = {r: 0 for r in todo}
            for resolutions in passes:
                self._encode_pass(slide, grid, resolutions, writers, bar, fallbacks)
            bar.close()
            if before_commit is not None:
                before_commit()
        if self.stain is not None and any(fallbacks.values()):
            log.info("slide %s: %s tiles left un-normalised (too little stain)", slide.slide_id, fallbacks)
        counts = {r: (len(grid.low_coords) if r == "low" else len(grid.high_coords)) for r in todo}
        return {**counts, **{f"stain_fallback_{r}": n for r, n in fallbacks.items()}}

    def _encode_pass(
        self,
        slide: SlideReader,
        grid: PairedGrid,
        resolutions: list[str],
        writers: dict[str, FeatureWriter],
        bar: tqdm,
        fallbacks: dict[str, int],
    ) -> None:
        enc_cfg = self.cfg.encoder
        dataset = RegionDataset(
            slide.path,
            self.cfg.slide.mpp_override,
            self.cfg.slide.mpp_tolerance,
            grid,
            self.cfg.tiling,
            want_low="low" in resolutions,
            want_high="high" in resolutions,
            stain=self.stain,
        )
        encoded = encode_grid(
            dataset,
            self.encoder,
            device=self.device,
            batch_size=enc_cfg.batch_size,
            num_workers=enc_cfg.num_workers,
            precision=enc_cfg.precision,
            token_grid=self.token_grid,
        )
        for batch in encoded:
            for res in resolutions:
                rows = np.flatnonzero(batch.resolution == res)
                if len(rows) == 0:
                    continue
                idx = batch.index[rows]
                if batch.stain_fallback is not None:
                    fallbacks[res] += int(batch.stain_fallback[rows].sum())
                if res == "low":
                    writers["low"].append(
                        batch.features[rows],
                        grid.low_coords[idx],
                        tokens=batch.tokens[rows] if batch.tokens is not None else None,
                    )
                else:
                    writers["high"].append(
                        batch.features[rows],
                        grid.high_coords[idx],
                        parent=grid.high_parent[idx],
                        child=grid.high_child[idx],
                    )
            bar.update(len(batch))

    @staticmethod
    def _write_reports(out_dir: Path, summary: SiteSummary) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        failures = out_dir / FAILURES_FILE
        if summary.failed:
            with atomic_write(failures, newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["slide_id", "path", "reason"])
                for s in summary.failed:
                    writer.writerow([s.slide_id, s.path, s.reason])
        else:
            failures.unlink(missing_ok=True)
        (out_dir / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=2))


def preprocess_site(site_dir: Path | str, cfg: PreprocessConfig, encoder: PatchEncoder | None = None) -> SiteSummary:
    """Preprocess one site directory (see DESIGN.md, data at a hospital)."""
    return SitePreprocessor(cfg, encoder).run(Path(site_dir))
