"""Pixel-level LRMIL stage 1 cost (issue 31): student forward + backward + optimiser step, patches/s and peak RSS.

    python tests/bench/bench_pixel_stage1.py [--encoder efficientnet_lite0] [--batch 32] [--steps 5]
        [--trainable all] [--threads 2] [--device cpu|cuda] [--precision auto] [--no-stain] [--no-checkpoint]
        [--json OUT.json]

Run on demand (not collected by pytest). Uses `Stage1Trainer.step` (the training step `fedslide finetune`
runs) on random 256-px uint8 patches with random teacher targets at the default layers (early, middle,
last), HED stain jitter included unless --no-stain. The first step is a warm-up and is not timed.
Reports patches/s and the process's peak resident memory (target on CPU at batch 32: <= 4 GiB).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time

import torch

from fedslide.client.encoders import build_encoder
from fedslide.client.lowres_finetune import Stage1Trainer
from fedslide.common.config.finetune import FinetuneConfig

RSS_TARGET_GIB = 4.0


def peak_rss_gib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="efficientnet_lite0")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--trainable", choices=["all", "last-n", "lora"], default="all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    ap.add_argument("--no-stain", action="store_true")
    ap.add_argument("--no-checkpoint", action="store_true", help="keep every activation (more memory)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    enc_cfg = {"name": args.encoder, "weights": args.weights, "device": args.device, "precision": args.precision}
    cfg = FinetuneConfig.model_validate(
        {
            "progress": False,
            "batch_size": args.batch,
            "trainable": args.trainable,
            "attention": "uniform",
            "stain": {"enabled": not args.no_stain},
            "checkpoint_activations": not args.no_checkpoint,
            "encoder": enc_cfg,
        }
    )
    device = torch.device(args.device)
    teacher = build_encoder(cfg.encoder).to(device).eval()
    trainer = Stage1Trainer(teacher, cfg, device)
    b, slots = args.batch, 16
    pixels = torch.randint(0, 256, (b, 3, args.size, args.size), dtype=torch.uint8)
    with torch.no_grad():
        out = teacher.forward_layers(teacher.normalize(pixels[:1].to(device)), trainer.layers)
    children = {layer: torch.randn(b, slots, out.summaries[layer].shape[1]).half() for layer in trainer.layers}
    final = torch.randn(b, slots, teacher.dim).half()
    mask = torch.ones(b, slots, dtype=torch.bool)
    trainer.step(pixels, children, final, mask, None)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = trainer.step(pixels, children, final, mask, None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    result = {
        "encoder": args.encoder,
        "trainable": args.trainable,
        "trainable_params": trainer.trainable_numel(),
        "layers": trainer.layers,
        "batch": b,
        "size": args.size,
        "steps": args.steps,
        "threads": args.threads,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "precision": trainer.precision,
        "stain_jitter": not args.no_stain,
        "checkpoint_activations": not args.no_checkpoint,
        "patches_per_s": round(b * args.steps / seconds, 2),
        "seconds_per_step": round(seconds / args.steps, 3),
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == "cuda" else None,
        "final_loss": round(float(loss.total), 4),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    if device.type == "cpu":
        result["rss_target_met"] = result["peak_rss_gib"] <= RSS_TARGET_GIB
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
