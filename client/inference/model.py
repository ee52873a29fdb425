"""Loading a student bundle for inference and the encoder it was trained on, refusing any mismatch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fedslide.client.encoders.base import PatchEncoder
from fedslide.client.encoders.registry import build_encoder
from fedslide.common.config.base import ConfigError
from fedslide.common.config.predict import PredictConfig
from fedslide.common.config.preprocess import EncoderConfig, TilingConfig, TissueConfig
from fedslide.common.distillation.bundle import (
    LOW_ENCODER_FILE,
    BundleMismatchError,
    StudentBundle,
    check_low_encoder_file,
    file_sha256,
)
from fedslide.common.device import resolve_device


class ModelDirError(ValueError):
    """The model directory is missing, not a bundle, or unusable for the requested mode."""


@dataclass(frozen=True)
class SlideSettings:
    """How inference tiles and encodes a slide: exactly as the bundle's training data was."""

    tissue: TissueConfig
    tiling: TilingConfig
    token_grid: int  # 0 = no tokens


def load_bundle(bundle_dir: Path | str) -> StudentBundle:
    """Read a student bundle; any problem becomes a ModelDirError naming the directory."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise ModelDirError(f"model directory {bundle_dir} does not exist (expected RUN_DIR/student)")
    try:
        return StudentBundle.load(bundle_dir, map_location="cpu")
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise ModelDirError(f"model directory {bundle_dir} is not a usable student bundle: {exc}") from exc


def slide_settings(bundle: StudentBundle) -> SlideSettings:
    """Tissue and tiling settings from the bundle's meta, checked against its resolutions."""
    m = bundle.meta
    try:
        tissue = TissueConfig.model_validate(m.tissue or {})
        tiling = TilingConfig.model_validate(
            {
                # bundles written by `fedslide distill` store kebab-case keys (to_toml_dict); the overrides
                # below are snake_case: normalise so one key is never given twice (an "extra input" error)
                **{str(k).replace("-", "_"): v for k, v in (m.tiling or {}).items()},
                "low_mpp": m.low_mpp,
                "low_patch_size": m.low_patch_size,
                "high_mpp": m.high_mpp,
                "high_patch_size": m.high_patch_size,
            }
        )
    except ValueError as exc:
        raise ModelDirError(f"the bundle's tissue/tiling settings are invalid: {exc}") from exc
    if m.child_grid and tiling.ratio != m.child_grid:
        raise ModelDirError(
            f"the bundle's tiling nests {tiling.ratio}×{tiling.ratio} children, but its child grid is {m.child_grid}"
        )
    return SlideSettings(tissue=tissue, tiling=tiling, token_grid=m.token_grid if bundle.uses_tokens else 0)


def low_encoder_weights(bundle: StudentBundle, cfg: PredictConfig) -> Path | None:
    """The fine-tuned 5x encoder's weights file: the bundle's own, else the site's (checked); None when not fine-tuned."""
    if not bundle.meta.low_finetuned:
        return None
    if bundle.low_encoder_weights is not None:
        return _bundle_file_or_refuse(bundle.low_encoder_weights, cfg.low_encoder_weights, "low-encoder-weights")
    if cfg.low_encoder_weights is None:
        raise ModelDirError(
            f"the bundle's student reads 5x features of a fine-tuned {bundle.meta.encoder_name} (weights "
            f"{str(bundle.meta.low_encoder_weights_hash)[:12]}) but carries no {LOW_ENCODER_FILE}; supply the file "
            "with --low-weights (predict.low-encoder-weights), e.g. SITE/finetune/<encoder>.pt"
        )
    if not cfg.low_encoder_weights.is_file():
        raise ModelDirError(f"predict.low-encoder-weights: {cfg.low_encoder_weights} is not a file")
    check_low_encoder_file(bundle.meta, cfg.low_encoder_weights)
    return cfg.low_encoder_weights


def _bundle_file_or_refuse(own: Path, given: Path | None, key: str) -> Path:
    """The bundle's own encoder weights file `own`; a `predict.<key>` file with other contents is refused (a
    ConfigError naming both files and hashes), never silently ignored. The same bytes (same sha256) pass."""
    if given is None:
        return own
    option = "--weights" if key == "encoder-weights" else "--low-weights"
    if not given.is_file():
        raise ConfigError(f"predict.{key} ({option}): {given} is not a file")
    theirs, ours = file_sha256(given), file_sha256(own)
    if theirs != ours:
        raise ConfigError(
            f"predict.{key} ({option}) = {given} (sha256 {theirs[:12]}) conflicts with the bundle's own {own.name} "
            f"({own}, sha256 {ours[:12]}), the fine-tuned encoder its models were trained on: drop {option} (the "
            "bundle's file is used) or use a bundle trained on those weights"
        )
    return own


def encoder_config(bundle: StudentBundle, cfg: PredictConfig, resolution: str = "high") -> EncoderConfig:
    """The encoder settings for one resolution: the bundle's encoder by name (the fine-tuned weights for a
    fine-tuned 5x encoder; the bundle's `encoder.pt` for an encoder fine-tuned at both levels, else
    `predict.encoder-weights`), the run's batch/worker/device options. A `predict.encoder-weights` file other than
    the bundle's `encoder.pt` is a ConfigError naming both."""
    weights = low_encoder_weights(bundle, cfg) if resolution == "low" else None
    if weights is None and bundle.encoder_weights is not None:
        weights = _bundle_file_or_refuse(bundle.encoder_weights, cfg.encoder_weights, "encoder-weights")
    return EncoderConfig(
        name=bundle.meta.encoder_name,
        weights=weights or cfg.encoder_weights,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        threads=cfg.threads,
        device=cfg.device,
        precision=cfg.precision,
    )


def check_encoder(bundle: StudentBundle, encoder: PatchEncoder, resolution: str = "high") -> None:
    """Refuse an encoder other than the bundle's for `resolution` (name, weights hash, fingerprint, dim); the
    message names both."""
    m = bundle.meta
    weights_hash, fingerprint = m.expected_encoder(resolution)
    differs = []
    if encoder.name != m.encoder_name:
        differs.append("name")
    if weights_hash and encoder.weights_hash != weights_hash:
        differs.append("weights hash")
    if fingerprint and encoder.fingerprint != fingerprint:
        differs.append("fingerprint (weights or normalisation)")
    if encoder.dim != m.encoder_dim:
        differs.append(f"dim {encoder.dim} vs {m.encoder_dim}")
    if differs:
        raise BundleMismatchError(
            f"the model was trained on {resolution}-res features of encoder {m.encoder_name} (weights "
            f"{weights_hash[:12]}, fingerprint {(fingerprint or 'unknown')[:12]}), but the encoder here is {encoder.name} "
            f"(weights {encoder.weights_hash[:12]}, fingerprint {encoder.fingerprint[:12]}); they differ in: "
            f"{', '.join(differs)}. Point --weights (predict.encoder-weights) at the weights the bundle was trained "
            "with, or use a bundle trained on this encoder"
        )
    if bundle.uses_tokens and not encoder.has_feature_map:
        raise BundleMismatchError(
            f"the student reads low-res tokens but encoder {encoder.name} has no spatial feature map to pool them from"
        )


def load_encoder(bundle: StudentBundle, cfg: PredictConfig, resolution: str = "high") -> PatchEncoder:
    """Build the bundle's encoder of one resolution (eval mode, on the configured device) and verify it is the
    one trained on. "low" gives the fine-tuned 5x encoder when the bundle has one, else the same as "high"."""
    settings = encoder_config(bundle, cfg, resolution)  # refuses fine-tuned weights of another hash
    try:
        encoder = build_encoder(settings)
    except ValueError as exc:
        raise ModelDirError(f"cannot build the bundle's encoder {bundle.meta.encoder_name!r}: {exc}") from exc
    check_encoder(bundle, encoder, resolution)
    device = resolve_device(cfg.device)
    encoder = encoder.to(device).eval()
    if device.type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch stubs omit Module.to(memory_format=)
    return encoder


def check_mode(bundle: StudentBundle, cfg: PredictConfig) -> None:
    """Refuse options the bundle cannot serve (zoom or high-res mode without a teacher)."""
    if cfg.resolution == "high" and cfg.zoom:
        raise ConfigError(
            "--zoom / --zoom-threshold (predict.zoom-k, predict.zoom-threshold) work on top of the low-res pass; "
            "they cannot be combined with --resolution high"
        )
    if (cfg.resolution == "high" or cfg.zoom) and bundle.teacher is None:
        what = "--resolution high" if cfg.resolution == "high" else "--zoom"
        raise ModelDirError(f"{what} runs the high-res teacher, but this bundle has none (no teacher.pt)")
