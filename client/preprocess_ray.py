"""Preprocessing of one site spread over a Ray cluster: one task per slide, each slide claimed before it is written.

The driver lists the site's slides and submits one Ray task per slide; the cluster places each task on a node
with a free CPU (or GPU: the task requests `ray-gpus-per-task` GPUs when the encoder runs on cuda). A task takes
the slide's claim (client/slide_claims.py), removes the slide's temp files left by a killed worker, and runs the
same `SitePreprocessor.process_slide` as the local path, so resume (a complete file with the same settings hash
is skipped) and completeness (files are written to temp names and renamed when whole) are the local path's. A
slide held by another live owner comes back as "claimed" and is asked for again after a pause, until it is
finished or its claim goes stale. A task whose worker dies is rerun by Ray (`ray-max-retries`); the rerun keeps
its task id and so takes over its own claim at once.

The site directory must be on storage every node sees at the same path (NFS, CephFS, Lustre, ...).
"""

from __future__ import annotations

import functools
import glob
import logging
import time
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any

from tqdm import tqdm

from fedslide.client.preprocess import SiteSummary, SitePreprocessor, SlideResult
from fedslide.client.slide_claims import claim_store
from fedslide.client.slides import SlideError, discover_slides, slide_id_of
from fedslide.common.atomic import TEMP_SUFFIX
from fedslide.common.config.base import ConfigError
from fedslide.common.config.preprocess import PreprocessConfig

log = logging.getLogger(__name__)

CLAIMED = "claimed"  # a task's status while another live owner holds the slide


def import_ray() -> ModuleType:
    """The `ray` module, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            "preprocess.executor = 'ray' needs the Ray package, which is not installed: "
            "pip install 'fedslide[cluster]' (or pip install ray==2.60.0), or use executor = 'local'"
        ) from exc
    return ray


def remove_slide_temps(site_dir: Path, encoder_name: str, slide_id: str) -> None:
    """Delete the temp feature files of one slide (only its claim holder may: they are a dead worker's)."""
    for res in ("low", "high"):
        pattern = str(Path(site_dir) / "features" / encoder_name / res / f".{glob.escape(slide_id)}.h5.*{TEMP_SUFFIX}")
        for stale in glob.glob(pattern):
            Path(stale).unlink(missing_ok=True)


def process_claimed(pre: SitePreprocessor, slide_path: Path, site_dir: Path, owner: str) -> SlideResult:
    """Process one slide under its claim; status 'claimed' (nothing written) while another live owner holds it."""
    slide_id = slide_id_of(slide_path)
    store = claim_store(site_dir, pre.encoder.name, pre.cfg.claim_lease_s)
    claim = store.try_claim(slide_id, owner)
    if claim is None:
        holder = store.holder(slide_id)
        who = f"{holder.owner} on {holder.host} (pid {holder.pid})" if holder else "another worker"
        return SlideResult(slide_id, str(slide_path), CLAIMED, reason=f"claimed by {who}")
    with claim:
        remove_slide_temps(site_dir, pre.encoder.name, slide_id)
        result = pre.process_slide(slide_path, site_dir, before_commit=claim.verify)
        if result.status == "failed" and claim.lost:
            return SlideResult(slide_id, str(slide_path), CLAIMED, seconds=result.seconds, reason=claim.lost_reason)
    return result


@functools.lru_cache(maxsize=1)
def _worker_preprocessor(cfg_json: str) -> SitePreprocessor:
    """One loaded encoder per Ray worker process and config (a worker runs many slide tasks)."""
    return SitePreprocessor(PreprocessConfig.model_validate_json(cfg_json))


def _slide_task(cfg_json: str, slide_path: str, site_dir: str) -> dict[str, Any]:
    """The body of one Ray task: preprocess one slide under its claim, owned by this task's id."""
    import ray

    owner = f"ray-task:{ray.get_runtime_context().get_task_id()}"
    pre = _worker_preprocessor(cfg_json)
    return asdict(process_claimed(pre, Path(slide_path), Path(site_dir), owner))


def task_options(ray: ModuleType, cfg: PreprocessConfig) -> dict[str, Any]:
    """Resources and retries of one slide task: GPUs when the encoder runs on cuda (`auto`: the cluster has GPUs)."""
    device = cfg.encoder.device
    gpu = device == "cuda" or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    return {
        "num_cpus": cfg.encoder.threads or 1,
        "num_gpus": cfg.ray_gpus_per_task if gpu else 0.0,
        "max_retries": cfg.ray_max_retries,
        "name": "fedslide-slide",
    }


def preprocess_site_ray(site_dir: Path | str, cfg: PreprocessConfig) -> SiteSummary:
    """Preprocess one site directory over a Ray cluster (joined at `cfg.ray_address`); see the module doc."""
    ray = import_ray()
    site_dir = Path(site_dir).resolve()
    start = time.perf_counter()
    slides = discover_slides(site_dir / "slides", cfg.slide.extensions)
    if not slides:
        raise SlideError(
            f"no slides in {site_dir / 'slides'} (looked for extensions: {', '.join(cfg.slide.extensions)})"
        )
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=cfg.ray_address, logging_level=logging.WARNING, configure_logging=False)
    try:
        results = _run_tasks(ray, cfg, site_dir, slides)
    finally:
        if started_here:
            ray.shutdown()
    summary = SiteSummary(site_dir=str(site_dir), encoder=cfg.encoder.name, slides=[results[p] for p in slides])
    summary.seconds = time.perf_counter() - start
    SitePreprocessor._write_reports(site_dir / "features" / cfg.encoder.name, summary)
    return summary


def _run_tasks(ray: ModuleType, cfg: PreprocessConfig, site_dir: Path, slides: list[Path]) -> dict[Path, SlideResult]:
    task = ray.remote(_slide_task).options(**task_options(ray, cfg))
    cfg_json = cfg.model_copy(update={"progress": False}).model_dump_json()  # no bars from the workers
    bar = tqdm(total=len(slides), desc=f"slides {site_dir.name} (ray)", unit="slide", disable=not cfg.progress)
    poll_s = min(max(cfg.claim_lease_s / 10, 0.5), 30.0)
    results: dict[Path, SlideResult] = {}
    pending = list(slides)
    while pending:
        refs = {task.remote(cfg_json, str(p), str(site_dir)): p for p in pending}
        pending = []
        waiting = list(refs)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=min(len(waiting), 64), timeout=1.0)
            for ref in ready:
                path = refs[ref]
                try:
                    result = SlideResult(**ray.get(ref))
                except ray.exceptions.RayError as exc:  # its worker died more than ray-max-retries times, or Ray failed
                    reason = f"slide {path.name}: Ray task failed: {type(exc).__name__}: {exc}".splitlines()[0]
                    log.error("%s", reason)
                    result = SlideResult(slide_id_of(path), str(path), "failed", reason=reason)
                if result.status == CLAIMED:
                    log.info("slide %s: %s; asking again in %.0f s", result.slide_id, result.reason, poll_s)
                    pending.append(path)
                else:
                    results[path] = result
                    bar.update(1)
        if pending:
            time.sleep(poll_s)
    bar.close()
    return results
