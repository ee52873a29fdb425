"""Preprocessing over a local Ray cluster: 1 vs 2 workers (run on demand, not by pytest).

    python -m tests.bench.bench_preprocess_ray --out /tmp/fedslide-bench-ray [--slides 8] [--workers 1 2]

For each worker count N it starts a loopback Ray head with N CPUs (one slide task per CPU, each with one torch
thread, OMP_NUM_THREADS=1), runs `fedslide preprocess --ray-address` over the same synthetic slides in a fresh site
and reports wall seconds and slides/s (the wall includes each worker's first encoder load, not the head's start).
A local run (`--executor local`, one thread) of the same slides is the reference. Figures are printed and written
to <out>/bench_preprocess_ray.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fedslide.client.synth.slide import write_slide
from tests.ray_cluster import LOOPBACK_ENV, local_ray_head

SMALL = ["--set", "encoder.threads=1", "--set", "encoder.num-workers=0", "--set", "qc-images=false", "--no-progress"]


def _make_slides(d: Path, n: int, size_um: float) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = d / f"slide{i:02d}.tif"
        if not path.exists():
            write_slide(path, size_um, size_um, 0.5, "generic", seed=100 + i, tumor=bool(i % 2))


def _preprocess(site: Path, extra: list[str]) -> tuple[float, dict]:
    env = {**os.environ, **LOOPBACK_ENV, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fedslide.deploy.cli", "preprocess", "--site", str(site), *SMALL, *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"preprocess failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return wall, json.loads((site / "features" / "efficientnet_lite0" / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--size-um", type=float, default=800.0, help="side of each synthetic slide, µm (at 0.5 µm/px)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-local", action="store_true", help="skip the local reference run")
    args = ap.parse_args()
    slides = args.out / "slides"
    _make_slides(slides, args.slides, args.size_um)
    runs: list[dict] = []

    def fresh_site(name: str) -> Path:
        site = args.out / name
        shutil.rmtree(site, ignore_errors=True)
        shutil.copytree(slides, site / "slides")
        return site

    if not args.no_local:
        wall, summary = _preprocess(fresh_site("local"), ["--executor", "local"])
        runs.append({"executor": "local", "workers": 1, "wall_s": wall, "summary": summary})
    for n in args.workers:
        with local_ray_head(num_cpus=n) as address:
            wall, summary = _preprocess(fresh_site(f"ray{n}"), ["--ray-address", address])
        runs.append({"executor": "ray", "workers": n, "wall_s": wall, "summary": summary})
    for r in runs:
        s = r["summary"]
        r["slides_per_s"] = s["done"] / r["wall_s"]
        r["patches"] = s["patches_low"] + s["patches_high"]
        per_slide = [x["seconds"] for x in s["slides"]]
        r["mean_slide_s"] = sum(per_slide) / len(per_slide)
        r["in_flight"] = sum(per_slide) / s["seconds"]  # slides processed at once, on average, while the driver ran
        print(
            f"{r['executor']:5s} workers={r['workers']}: {s['done']} slides, {r['patches']} patches, "
            f"wall {r['wall_s']:.1f} s, {r['slides_per_s']:.3f} slides/s, {r['mean_slide_s']:.2f} s per slide, "
            f"{r['in_flight']:.2f} slides in flight"
        )
        del r["summary"]["slides"]
    info = {"cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0], "slides": args.slides}
    (args.out / "bench_preprocess_ray.json").write_text(json.dumps({"machine": info, "runs": runs}, indent=2))
    print(f"machine: {info}")


if __name__ == "__main__":
    main()
