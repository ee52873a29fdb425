"""VIB fine-tuning cost (issue 34): patches through the encoder forward + backward per slide, VIB vs full.

    python tests/bench/bench_vib.py --site /tmp/H48/site1 [--slides 4] [--bag-size 16] [--keep 1024]
        [--trainable last-n] [--last-n 2] [--threads 1] [--selector-epochs 20] [--json OUT.json]

Run on demand (not collected by pytest). The site is read only: a view of it (links to its slides, labels and
feature folders) is made under --work. The selector (stage A) trains on the site's train slides' frozen 20×
features; then, for the first --slides train slides, one `VIBTrainer.step` (the step `fedslide finetune --method
vib` runs) on the slide's selected patches is timed against the same step on every 20× patch of the slide (full
end-to-end fine-tuning of the same encoder and head). Each arm has one untimed warm-up step on the first slide.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedslide.client.encoders import build_encoder
from fedslide.client.vib_finetune import VIBTrainer, read_selected, site_bags, train_selector
from fedslide.common.config.vib import VIBConfig
from fedslide.common.distillation.vib import select_instances


def view_of(site: Path, work: Path) -> Path:
    """A site folder whose slides, labels and feature folders link to `site` (outputs land in the view)."""
    view = work / site.name
    (view / "features").mkdir(parents=True, exist_ok=True)
    for name in ("slides", "labels.csv"):
        if not (view / name).exists():
            (view / name).symlink_to(site / name)
    for enc in (site / "features").iterdir():
        if enc.is_dir() and not (view / "features" / enc.name).exists():
            (view / "features" / enc.name).symlink_to(enc)
    return view


def _timed_step(trainer: VIBTrainer, pixels: torch.Tensor, label: int) -> float:
    start = time.perf_counter()
    trainer.step(pixels, label)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vib_bench_view"))
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--bag-size", type=int, default=16)
    ap.add_argument("--keep", type=int, default=1024)
    ap.add_argument("--trainable", choices=["all", "last-n", "lora"], default="last-n")
    ap.add_argument("--last-n", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--selector-epochs", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = VIBConfig.model_validate(
        {
            "bag_size": args.bag_size,
            "keep": args.keep,
            "trainable": args.trainable,
            "last_n": args.last_n,
            "selector_epochs": args.selector_epochs,
            "progress": False,
            "encoder": {"device": "cpu", "num_workers": 0},
        }
    )
    site = site_bags(view_of(args.site, args.work), cfg)
    start = time.perf_counter()
    selector = train_selector(site.bags, len(site.classes), cfg, cfg.seed)
    selector_s = time.perf_counter() - start
    bags = site.bags[: args.slides]
    for bag in bags:
        bag.selected = select_instances(selector, bag.features, cfg.bag_size)
    read_selected(bags, cfg, site.stain)
    vib_pixels = [b.pixels for b in bags]
    for bag in bags:  # every patch of the slide, for full fine-tuning
        bag.selected = torch.arange(len(bag.features))
    read_selected(bags, cfg, site.stain)
    full_pixels = [b.pixels for b in bags]

    encoder = build_encoder(cfg.encoder).eval()
    rows = []
    for arm, pixels in (("vib", vib_pixels), ("full", full_pixels)):
        trainer = VIBTrainer(encoder, len(site.classes), cfg, torch.device("cpu"))
        assert pixels[0] is not None
        trainer.step(pixels[0], bags[0].label)  # warm-up
        for bag, px in zip(bags, pixels):
            assert px is not None
            rows.append(
                {"arm": arm, "slide": bag.slide_id, "patches": len(px), "seconds": _timed_step(trainer, px, bag.label)}
            )
    summary = {
        arm: {
            "patches_per_slide": float(np.mean([r["patches"] for r in rows if r["arm"] == arm])),
            "seconds_per_slide": float(np.mean([r["seconds"] for r in rows if r["arm"] == arm])),
        }
        for arm in ("vib", "full")
    }
    out = {
        "site": str(args.site),
        "slides": len(bags),
        "train_slides": len(site.bags),
        "selector_seconds": selector_s,
        "config": {k: getattr(args, k) for k in ("bag_size", "keep", "trainable", "last_n", "threads")},
        "trainable_params": VIBTrainer(encoder, len(site.classes), cfg, torch.device("cpu")).trainable_numel(),
        "rows": rows,
        "summary": summary,
        "ratio_patches": summary["full"]["patches_per_slide"] / summary["vib"]["patches_per_slide"],
        "ratio_seconds": summary["full"]["seconds_per_slide"] / summary["vib"]["seconds_per_slide"],
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    for r in rows:
        print(f"{r['arm']:5s} {r['slide']:20s} {r['patches']:5d} patches {r['seconds']:7.2f} s")
    print(json.dumps({k: out[k] for k in ("summary", "ratio_patches", "ratio_seconds", "selector_seconds")}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
