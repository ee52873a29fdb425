"""`fedslide finetune --method vib`: VIB task-specific fine-tuning of a site's 20× encoder, then re-encoding."""

from __future__ import annotations

import argparse
import sys

from fedslide.common.cli_support import EXIT_OK, EXIT_USAGE, config_from_args
from fedslide.common.config.vib import VIBConfig

_LRMIL_ONLY = ("layers", "batch_size", "max_patches", "teacher_attention")


def run_vib(args: argparse.Namespace) -> int:
    """Fine-tune with VIB (section [vib]) and re-encode; flags of the LRMIL stage 1 only are refused."""
    from fedslide.client.slides import SlideError
    from fedslide.client.vib_finetune import run_vib_site
    from fedslide.common.features import FeatureFileError
    from fedslide.common.training.errors import TrainingInputError

    given = [f"--{k.replace('_', '-')}" for k in _LRMIL_ONLY if getattr(args, k, None) is not None]
    if given:
        print(f"fedslide finetune --method vib: {', '.join(given)} apply to --method lrmil only", file=sys.stderr)
        return EXIT_USAGE
    values = {
        "encoder.name": args.encoder,
        "encoder.weights": str(args.weights) if args.weights else None,
        "encoder.device": args.device,
        "trainable": args.trainable,
        "last_n": args.last_n,
        "epochs": args.epochs,
        "reencode": args.reencode,
        "overwrite": args.overwrite,
        "progress": args.progress,
    }
    cfg = config_from_args(VIBConfig, args, "vib", values)
    if not args.site.is_dir():
        print(f"fedslide finetune: site directory {args.site} does not exist", file=sys.stderr)
        return EXIT_USAGE
    try:
        result, reencoded = run_vib_site(args.site, cfg)
    except (FeatureFileError, TrainingInputError, SlideError) as exc:
        print(f"fedslide finetune --method vib: {exc}", file=sys.stderr)
        return EXIT_USAGE
    state = "reused" if result.skipped else f"{result.seconds:.1f} s"
    print(
        f"{args.site}: VIB-fine-tuned {result.encoder} ({cfg.trainable}, {result.trainable_params} parameters; "
        f"{result.slides} slides, {result.selected} of {result.instances} 20× instances selected, "
        f"{result.patches_forward_backward} patch forward+backward passes; {state}) -> {result.weights} "
        f"(sha256 {result.weights_hash[:12]})"
    )
    if reencoded is not None:
        levels = ", ".join(f"{level} {n} slides" for level, n in reencoded.slides.items())
        print(f"  re-encoded into {args.site}/features/{reencoded.features}: {levels}")
    return EXIT_OK
