"""The 5x features a fold's bundle reads at a site: the site's own encoder files, or, when the fold fine-tuned its
5x encoder (pixel stage 1 or VIB), that encoder's folder (`features/<encoder>-ft-<hash12>` / `-vib-<hash12>`,
`common.distillation.feature_folders`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from fedslide.common.distillation.bundle import BundleMismatchError, StudentBundle
from fedslide.common.distillation.data import SlidePair
from fedslide.common.distillation.feature_folders import find_finetuned_features
from fedslide.common.features import feature_path, read_feature_file


def bundle_slide(bundle: StudentBundle, slide: SlidePair, site_dir: Path) -> SlidePair:
    """`slide` with the 5x features the bundle's student reads: when its 5x encoder was fine-tuned (pixel stage 1 or
    VIB), the slide's file in the site's folder of those weights (`features/<encoder>-ft-<hash12>` or
    `-vib-<hash12>`); unchanged when the slide's own file already fits or no such file exists (then
    `check_features` refuses it, naming both encoders)."""
    weights_hash, _ = bundle.meta.expected_encoder("low")
    if not weights_hash or str(slide.low.attrs.get("encoder_weights_hash", "")) == weights_hash:
        return slide
    name = find_finetuned_features(site_dir, bundle.meta.encoder_name, weights_hash)
    path = feature_path(site_dir, name, "low", slide.slide_id) if name is not None else None
    if path is None or not path.is_file():
        return slide
    return replace(slide, low=read_feature_file(path, load_tokens=True))


def matching_slide(bundle: StudentBundle, slide: SlidePair, site_dir: Path) -> SlidePair:
    """`bundle_slide`, refusing (BundleMismatchError naming the slide, the bundle's and the files' weights hash) a
    slide that has no 5x file of the bundle's encoder at the site, or whose file differs otherwise."""
    found = bundle_slide(bundle, slide, site_dir)
    weights_hash, _ = bundle.meta.expected_encoder("low")
    theirs = str(found.low.attrs.get("encoder_weights_hash", "") or "")
    if weights_hash and theirs and theirs != weights_hash:
        raise BundleMismatchError(
            f"slide {slide.slide_id}: the bundle's student reads 5x features of encoder {bundle.meta.encoder_name} "
            f"weights {weights_hash[:12]}, but {site_dir} has none (its file {found.low.path} has weights "
            f"{theirs[:12]}); extract the features of the fold's fine-tuned encoder at this site first"
        )
    bundle.check_features(found.low.attrs)
    return found
