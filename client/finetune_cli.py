"""`fedslide finetune`: pixel-level LRMIL stage 1 at a site, then re-encoding of its 5× features."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedslide.common.cli_support import EXIT_OK, EXIT_USAGE, add_config_arguments, config_from_args
from fedslide.common.config.finetune import FinetuneConfig


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="LRMIL stage 1 on pixels: fine-tune the site's 5× encoder against its 20× encoder, re-encode 5× features",
        description=(
            "Fine-tune a copy of the site's encoder on its 5× patches so that its tokens over each 20× child match "
            "the frozen encoder's embedding of that child (configurable layers, attention-weighted whole-patch "
            "term, HED stain jitter); write SITE/finetune/<encoder>.pt and re-encode SITE/features/<encoder>/low "
            "into SITE/features/<encoder>-ft-<hash12>/low (hash12: the fine-tuned weights' sha256; resumable). Needs "
            "`fedslide preprocess` first. "
            "Exit codes: 0 done, 2 bad configuration or missing inputs."
        ),
    )
    p.add_argument("site", type=Path, metavar="SITE_DIR", help="site directory (slides/ and features/)")
    p.add_argument(
        "--method",
        choices=["lrmil", "vib"],
        default="lrmil",
        help="lrmil: pixel stage 1 on 5× patches ([finetune]); vib: task-specific fine-tuning of the 20× encoder "
        "through an information bottleneck's selected instances ([vib]; labels needed)",
    )
    p.add_argument("--encoder", default=None, help="encoder name (default efficientnet_lite0)")
    p.add_argument("--weights", type=Path, default=None, help="local weights file of the site's encoder")
    p.add_argument("--trainable", choices=["all", "last-n", "lora"], default=None, help="what trains")
    p.add_argument("--last-n", type=int, default=None, help="layers trained with --trainable last-n")
    p.add_argument("--layers", default=None, help="comma-separated layers to align (indices or early,middle,last)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the sampled 5× patches")
    p.add_argument("--batch-size", type=int, default=None, help="5× patches per step")
    p.add_argument("--max-patches", type=int, default=None, help="5× patches sampled over the site")
    p.add_argument("--teacher-attention", type=Path, default=None, help="torch file {slide_id: attention [H]}")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument("--no-reencode", dest="reencode", action="store_false", default=None, help="fine-tune only")
    p.add_argument("--overwrite", action="store_true", default=None, help="fine-tune and re-encode again")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars")
    add_config_arguments(p, example="trainable=last-n")
    p.set_defaults(handler=run)


def _layers(text: str | None) -> list[int | str] | None:
    if text is None:
        return None
    return [int(t) if t.strip().lstrip("-").isdigit() else t.strip() for t in text.split(",") if t.strip()]


def run(args: argparse.Namespace) -> int:
    if args.method == "vib":
        from fedslide.client.vib_cli import run_vib

        return run_vib(args)
    from fedslide.client.lowres_finetune import run_site
    from fedslide.client.slides import SlideError
    from fedslide.common.features import FeatureFileError

    values = {
        "encoder.name": args.encoder,
        "encoder.weights": str(args.weights) if args.weights else None,
        "encoder.device": args.device,
        "trainable": args.trainable,
        "last_n": args.last_n,
        "layers": _layers(args.layers),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "max_patches": args.max_patches,
        "teacher_attention": str(args.teacher_attention) if args.teacher_attention else None,
        "reencode": args.reencode,
        "overwrite": args.overwrite,
        "progress": args.progress,
    }
    cfg = config_from_args(FinetuneConfig, args, "finetune", values)
    if not args.site.is_dir():
        print(f"fedslide finetune: site directory {args.site} does not exist", file=sys.stderr)
        return EXIT_USAGE
    try:
        result, reencoded = run_site(args.site, cfg)
    except (FeatureFileError, SlideError) as exc:
        print(f"fedslide finetune: {exc}", file=sys.stderr)
        return EXIT_USAGE
    state = (
        "reused" if result.skipped else f"{result.patches} patches of {result.slides} slides, {result.seconds:.1f} s"
    )
    last = result.history[-1] if result.history else {}
    print(
        f"{args.site}: fine-tuned {result.encoder} ({result.trainable}, {result.trainable_params} parameters, "
        f"layers {result.layers}; {state}); final loss {last.get('total', float('nan')):.4g} -> {result.weights} "
        f"(sha256 {result.weights_hash[:12]})"
    )
    if reencoded is not None:
        print(
            f"  re-encoded 5× features into {args.site}/features/{reencoded.features}/low: {len(reencoded.done)} "
            f"done, {len(reencoded.skipped)} skipped, {reencoded.seconds:.1f} s (distill --set "
            f"low-features={reencoded.features})"
        )
    return EXIT_OK
