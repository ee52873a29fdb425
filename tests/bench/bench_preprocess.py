"""Preprocessing benchmark (run on demand, not by pytest).

    python tests/bench/bench_preprocess.py --out /tmp/fedslide-bench [--skip-big]

Measures, on synthetic slides made by `client.synth`:
1. encoder-only throughput (patches/s) on in-memory batches;
2. end-to-end preprocessing throughput of one slide (both resolutions) with the same batch size
   and threads; target: ≥ 80 % of (1);
3. low-res-only vs high-res preprocessing time of the same slide; target: low ≥ 10× faster
   (each mode runs the slide twice in one job: cold, then warm = the per-slide cost of a job);
4. peak memory (sum over the process tree: RSS and PSS) while preprocessing a 24000×24000-px
   slide in a separate `fedslide preprocess` process; target: ≤ 2 GiB.
Figures are printed and written to <out>/bench_preprocess.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

from fedslide.client.encoders import build_encoder
from fedslide.client.preprocess import SitePreprocessor
from fedslide.client.synth.slide import write_slide
from fedslide.common.config.preprocess import EncoderConfig, PreprocessConfig


def encoder_only(cfg: EncoderConfig, patch: int, batches: int) -> float:
    """Patches/s of the encoder alone on random uint8 batches (after one warm-up batch)."""
    enc = build_encoder(cfg).eval()
    x = torch.randint(0, 256, (cfg.batch_size, 3, patch, patch), dtype=torch.uint8)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        enc.encode(x, token_grid=4)
        start = time.perf_counter()
        for _ in range(batches):
            enc.encode(x, token_grid=4)
    return batches * cfg.batch_size / (time.perf_counter() - start)


def preprocess_once(slide: Path, root: Path, resolutions: str, enc_cfg: EncoderConfig) -> dict:
    """Preprocess one slide in a fresh site folder, twice with the same job: the first run is cold
    (the encoder's first forward passes), the second is the per-slide cost inside a many-slide job.
    """
    site = root / f"site-{resolutions}"
    shutil.rmtree(site, ignore_errors=True)
    (site / "slides").mkdir(parents=True)
    (site / "slides" / slide.name).symlink_to(slide.resolve())
    cfg = PreprocessConfig(resolutions=resolutions, progress=False, qc_images=False, overwrite=True, encoder=enc_cfg)
    pre = SitePreprocessor(cfg)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        summary = pre.run(site)
        times.append(time.perf_counter() - start)
        result = summary.slides[0]
        assert result.status == "done", result.reason
    patches = result.patches_low + result.patches_high
    return {
        "seconds": times[1],
        "seconds_cold": times[0],
        "patches_low": result.patches_low,
        "patches_high": result.patches_high,
        "patches_per_s": patches / times[1],
    }


def peak_memory(cmd: list[str], interval: float = 0.5) -> dict:
    """Run `cmd`; poll the RSS and PSS summed over it and its children; return peaks and wall time."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {"rss": 0, "pss": 0}
    done = threading.Event()

    def poll() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                rss = pss = 0
                for p in procs:
                    try:
                        info = p.memory_full_info()
                        rss += info.rss
                        pss += info.pss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
                peaks["rss"], peaks["pss"] = max(peaks["rss"], rss), max(peaks["pss"], pss)
            except psutil.NoSuchProcess:
                return
            time.sleep(interval)

    start = time.perf_counter()
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return {
        "peak_rss_gib": peaks["rss"] / 2**30,
        "peak_pss_gib": peaks["pss"] / 2**30,
        "seconds": time.perf_counter() - start,
        "log_tail": out[-600:],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--slide-um", type=float, default=3000.0, help="side of the throughput slide, µm")
    ap.add_argument("--big-px", type=int, default=24000, help="side of the memory slide at 20×, px")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--skip-big", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    enc_cfg = EncoderConfig(batch_size=args.batch_size, threads=args.threads, num_workers=args.workers)
    results: dict = {
        "batch_size": args.batch_size,
        "threads": args.threads,
        "workers": args.workers,
        "cpu_count": psutil.cpu_count(),
        "torch": torch.__version__,
    }

    slide = args.out / "bench_slide.tif"
    if not slide.exists():
        write_slide(slide, args.slide_um, args.slide_um, 0.5, "generic", seed=7, tumor=True, tumor_fraction=0.3)
    results["encoder_only_patches_per_s"] = encoder_only(enc_cfg, 256, batches=8)
    both = preprocess_once(slide, args.out, "both", enc_cfg)
    results["end_to_end_both"] = both
    results["end_to_end_fraction_of_encoder_only"] = both["patches_per_s"] / results["encoder_only_patches_per_s"]
    high = preprocess_once(slide, args.out, "high", enc_cfg)
    low = preprocess_once(slide, args.out, "low", enc_cfg)
    results["high_only"], results["low_only"] = high, low
    results["low_speedup_vs_high"] = high["seconds"] / low["seconds"]
    results["low_speedup_vs_both"] = both["seconds"] / low["seconds"]
    results["low_speedup_vs_high_cold"] = high["seconds_cold"] / low["seconds_cold"]
    results["load_average_1min_at_end"] = psutil.getloadavg()[0]
    print(json.dumps(results, indent=2))

    if not args.skip_big:
        big_site = args.out / "big"
        big = big_site / "slides" / "big24k.tif"
        if not big.exists():
            big.parent.mkdir(parents=True, exist_ok=True)
            side_um = args.big_px * 0.5
            t0 = time.perf_counter()
            write_slide(big, side_um, side_um, 0.5, "generic", seed=11, tumor=True, tumor_fraction=0.3, progress=True)
            results["big_slide_write_seconds"] = time.perf_counter() - t0
        shutil.rmtree(big_site / "features", ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "fedslide.deploy.cli",
            "preprocess",
            "--site",
            str(big_site),
            "--no-progress",
            "--batch-size",
            str(args.batch_size),
            "--workers",
            str(args.workers),
            "--set",
            f"encoder.threads={args.threads}",
        ]
        results["big_slide"] = peak_memory(cmd)
        print(json.dumps(results["big_slide"], indent=2))
    (args.out / "bench_preprocess.json").write_text(json.dumps(results, indent=2))
    print(f"written {args.out / 'bench_preprocess.json'}")


if __name__ == "__main__":
    main()
