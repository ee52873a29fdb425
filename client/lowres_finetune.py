"""Pixel-level LRMIL stage 1 at one site: fine-tune a 5× copy of the site's encoder, then re-encode its 5× features.

The student starts as a copy of the site's (frozen) encoder. Its 5× patches are read from the slides at the
grid of the site's existing feature files (`fedslide preprocess` first); for each sampled 5× patch the frozen
teacher encodes the 20× children that preprocessing kept, once, at the aligned layers. The student then
trains so that, layer by layer, its tokens over each child match the teacher's embedding of that child,
plus the attention-weighted whole-patch term (see common/distillation/pixel_stage1_loss.py). Pixels and
features stay at the site; the fine-tuned weights are a plain state_dict of the same architecture, so
`encoder.weights` can point at them, and the re-encoded 5× files record their sha256 as the weights hash.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from fedslide.client.encoders.base import PatchEncoder, sha256_file
from fedslide.client.encoders.registry import build_encoder
from fedslide.client.encoding import autocast_for, encode_grid
from fedslide.client.patch_loader import RegionDataset
from fedslide.client.slides import SlideReader, discover_slides, slide_id_of
from fedslide.client.stain_augment import hed_jitter
from fedslide.client.stain_normalize import StainNormalizer, stain_normalizer_from_identity
from fedslide.client.tiling import PairedGrid
from fedslide.common.atomic import atomic_path, atomic_write
from fedslide.common.config.base import ConfigError
from fedslide.common.config.finetune import FinetuneConfig
from fedslide.common.config.preprocess import TilingConfig
from fedslide.common.device import resolve_device
from fedslide.common.distillation.feature_folders import finetuned_features_name
from fedslide.common.distillation.pixel_stage1_loss import Stage1Loss, pixel_stage1_loss
from fedslide.common.training.splits import recorded_splits
from fedslide.common.features import (
    STAIN_ATTR,
    FeatureFileError,
    FeatureMeta,
    FeatureWriter,
    config_hash,
    feature_path,
    is_complete,
    recorded_preprocess,
    shared_stain_identity,
    stain_identity,
)

log = logging.getLogger(__name__)

_READ_CHUNK = 16  # 5× patches whose 20× children are read and encoded by the teacher together
_FILE_KEYS = {"format_version", "num_patches", "fedslide_complete"}


# ---------------------------------------------------------------- what trains


def _set_bn_mode(model: nn.Module, update_stats: bool) -> None:
    """BatchNorm layers keep their running statistics unless `update_stats` and their affine parameters train."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            trains = any(p.requires_grad for p in module.parameters(recurse=False))
            module.train(update_stats and trains)


def _lora_targets(model: PatchEncoder) -> list[str]:
    """Linear layers and 1×1 stride-1 convolutions (whose LoRA branch needs no padding of its own)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            names.append(name)
        elif isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1):
            names.append(name)
    return names


def configure_trainable(student: PatchEncoder, cfg: FinetuneConfig) -> list[str]:
    """Freeze what does not train (in place; LoRA adapters are injected with peft) and name what does."""
    for p in student.parameters():
        p.requires_grad_(cfg.trainable == "all")
    if cfg.trainable == "last-n":
        layers = student.layer_modules()
        if cfg.last_n > len(layers):
            raise ConfigError(f"finetune.last-n = {cfg.last_n}, but encoder {student.name!r} has {len(layers)} layers")
        for module in layers[-cfg.last_n :]:
            for p in module.parameters():
                p.requires_grad_(True)
    elif cfg.trainable == "lora":
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as exc:
            raise ConfigError(
                "finetune.trainable = 'lora' needs the optional `peft` package (pip install 'fedslide[lora]')"
            ) from exc
        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=_lora_targets(student),
        )
        inject_adapter_in_model(lora, student)
    return [name for name, p in student.named_parameters() if p.requires_grad]


def merged_state(student: PatchEncoder) -> dict[str, Tensor]:
    """The student's state_dict in the original architecture's keys (LoRA branches merged into their layers)."""
    model: nn.Module = student
    if any("lora_" in name for name, _ in student.named_parameters()):
        from peft.tuners.tuners_utils import BaseTunerLayer

        model = copy.deepcopy(student)
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
        state = {}
        for key, value in model.state_dict().items():
            if "lora_" in key:
                continue
            state[key.replace(".base_layer.", ".")] = value
        return {k: v.detach().cpu().clone() for k, v in state.items()}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- the training set


@dataclass
class PatchSet:
    """Sampled 5× patches with the teacher's targets on their 20× children (slot s = row * R + col)."""

    pixels: Tensor  # [P, 3, S, S] uint8
    mask: Tensor  # [P, R²] bool: child kept by preprocessing
    children: dict[int, Tensor]  # layer -> [P, R², C_L] float16, the teacher's layer embedding of each child
    final: Tensor  # [P, R², D] float16, the teacher's final embedding of each child
    attention: Tensor | None  # [P, R²] teacher MIL attention on the children, or None
    slides: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.pixels.shape[0])


@dataclass(frozen=True)
class _SlideFiles:
    slide_id: str
    slide_path: Path
    low: Path
    high: Path


def _grid_arrays(path: Path, keys: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Some datasets of a feature file (not its features) and its attributes."""
    with h5py.File(path, "r") as f:
        missing = [k for k in keys if k not in f]
        if missing:
            raise FeatureFileError(f"{path}: no {', '.join(missing)} dataset(s); rerun `fedslide preprocess`")
        arrays = {k: np.asarray(f[k][()]) for k in keys}
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    return arrays, {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}


def _site_files(site_dir: Path, cfg: FinetuneConfig, encoder_name: str, need_high: bool) -> list[_SlideFiles]:
    """Slides with a complete 5× (and, when needed, 20×) feature file, matched to their slide file."""
    low_dir = site_dir / "features" / encoder_name / "low"
    slides = {slide_id_of(p): p for p in discover_slides(site_dir / "slides", cfg.slide.extensions)}
    out = []
    for low in sorted(low_dir.glob("*.h5")):
        high = feature_path(site_dir, encoder_name, "high", low.stem)
        if not is_complete(low) or (need_high and not is_complete(high)):
            continue
        if low.stem not in slides:
            raise FeatureFileError(f"{low}: no slide {low.stem}.* under {site_dir / 'slides'} to read its pixels from")
        out.append(_SlideFiles(low.stem, slides[low.stem], low, high))
    if not out:
        what = "5× and 20× feature files" if need_high else "5× feature files"
        raise FeatureFileError(
            f"no complete {what} under {site_dir / 'features' / encoder_name}; run `fedslide preprocess` first"
        )
    return out


def _sampled_files(site_dir: Path, cfg: FinetuneConfig, files: list[_SlideFiles]) -> list[_SlideFiles]:
    """The slides stage 1 may sample: not the test split's unless `sample-test-slides` (test pixels stay unseen)."""
    if cfg.sample_test_slides:
        return files
    splits = recorded_splits(site_dir) if (site_dir / "labels.csv").is_file() else {}
    if not splits:
        log.warning(
            "%s: no recorded splits (labels.csv split column or splits.csv), so stage 1 samples every slide; run a "
            "distill or federation first to carve them, or give labels.csv a split column",
            site_dir,
        )
    kept = [sf for sf in files if splits.get(sf.slide_id) != "test"]
    if not kept:
        raise FeatureFileError(
            f"{site_dir}: every slide with feature files is a test slide; nothing is left to fine-tune on "
            "(finetune.sample-test-slides = true samples them)"
        )
    if len(kept) < len(files):
        log.info("%s: stage 1 samples %d of %d slides (test slides left out)", site_dir, len(kept), len(files))
    return kept


def _file_attrs(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def site_stain_identity(site_dir: Path | str, cfg: FinetuneConfig, encoder_name: str) -> dict[str, Any]:
    """The stain normalisation the site's 5× (and present 20×) feature files record (one for all; a mix is
    refused)."""
    files = _site_files(Path(site_dir), cfg, encoder_name, need_high=False)
    paths = [path for sf in files for path in (sf.low, sf.high) if path.is_file()]
    return shared_stain_identity((path, _file_attrs(path)) for path in paths)


def _normalized(stain: StainNormalizer | None, tiles: np.ndarray) -> np.ndarray:
    """Tiles [B, 3, H, W] uint8 stain-normalised one by one as preprocessing did (fallbacks left as read)."""
    return tiles if stain is None or not len(tiles) else stain(tiles)[0]


def _load_attention(cfg: FinetuneConfig) -> dict[str, Tensor] | None:
    if cfg.attention_mode != "teacher" or cfg.teacher_attention is None:
        return None
    path = Path(cfg.teacher_attention)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the same to the user
        raise ConfigError(f"finetune.teacher-attention = {str(path)!r}: not readable ({exc})") from exc
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConfigError(f"finetune.teacher-attention = {str(path)!r}: expected a dict of slide_id -> tensor [H]")
    return {str(k): v.float().flatten() for k, v in obj.items()}


@torch.inference_mode()
def teacher_targets(
    teacher: PatchEncoder,
    children: Tensor,
    layers: Sequence[int],
    *,
    device: torch.device,
    batch_size: int,
    precision: str,
) -> tuple[dict[int, Tensor], Tensor]:
    """The teacher's layer embeddings {L: [K, C_L]} and final embeddings [K, D] of uint8 patches [K, 3, s, s]."""
    parts: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    finals = []
    with autocast_for(device, precision):
        for start in range(0, len(children), batch_size):
            x = teacher.normalize(children[start : start + batch_size].to(device))
            out = teacher.forward_layers(x, layers)
            for layer in layers:
                parts[layer].append(out.summaries[layer].float().cpu())
            finals.append(out.embedding.float().cpu())
    return {layer: torch.cat(v) for layer, v in parts.items()}, torch.cat(finals)


def collect_patches(
    site_dir: Path, cfg: FinetuneConfig, teacher: PatchEncoder, layers: Sequence[int], device: torch.device
) -> PatchSet:
    """Sample 5× patches over the site's slides, read them and their 20× children, compute the teacher targets."""
    files = _sampled_files(site_dir, cfg, _site_files(site_dir, cfg, teacher.name, need_high=True))
    rng = np.random.default_rng(cfg.seed)
    attention = _load_attention(cfg)
    if attention is not None:
        missing = [sf.slide_id for sf in files if sf.slide_id not in attention]
        if missing:
            raise ConfigError(f"finetune.teacher-attention has no entry for slide(s) {', '.join(map(repr, missing))}")
    plan: list[tuple[int, int]] = []  # (file index, low index)
    grids = []
    for i, sf in enumerate(files):
        low, low_attrs = _grid_arrays(sf.low, ["coords"])
        high, high_attrs = _grid_arrays(sf.high, ["coords", "parent", "child"])
        grids.append((low, low_attrs, high, high_attrs))
        with_children = np.unique(high["parent"])
        take = min(cfg.max_patches_per_slide, len(with_children))
        plan.extend((i, int(k)) for k in rng.choice(with_children, size=take, replace=False))
    if not plan:
        raise FeatureFileError(f"no 5× patch of {site_dir} has a 20× child to align to")
    if len(plan) > cfg.max_patches:
        keep = np.sort(rng.choice(len(plan), size=cfg.max_patches, replace=False))
        plan = [plan[k] for k in keep]
    plan.sort()
    # patches are read as preprocessing read them for the features the targets and student must match
    stain = stain_normalizer_from_identity(
        shared_stain_identity(
            [(sf.low, g[1]) for sf, g in zip(files, grids)] + [(sf.high, g[3]) for sf, g in zip(files, grids)]
        )
    )

    pixels, masks, attns, used = [], [], [], []
    children_by_layer: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    finals: list[Tensor] = []
    bar = tqdm(total=len(plan), desc="stage-1 targets", unit="patch", disable=not cfg.progress)
    for i, sf in enumerate(files):
        lows = [k for f, k in plan if f == i]
        if not lows:
            continue
        low, low_attrs, high, high_attrs = grids[i]
        ratio = int(high_attrs.get("child_grid", 0)) or int(low_attrs.get("child_grid", 0))
        if ratio < 1:
            raise FeatureFileError(f"{sf.high}: attribute child_grid is missing; rerun `fedslide preprocess`")
        slots = ratio * ratio
        h_size, h_mpp = int(high_attrs["patch_size"]), float(high_attrs["target_mpp"])
        l_size, l_mpp = int(low_attrs["patch_size"]), float(low_attrs["target_mpp"])
        slide_att = None
        if attention is not None:
            slide_att = attention[sf.slide_id]
            if slide_att.numel() != len(high["parent"]):
                raise ConfigError(
                    f"finetune.teacher-attention[{sf.slide_id!r}] has {slide_att.numel()} values; "
                    f"{sf.high} has {len(high['parent'])} patches"
                )
        with SlideReader(sf.slide_path, cfg.slide.mpp_override, cfg.slide.mpp_tolerance) as slide:
            for first in range(0, len(lows), _READ_CHUNK):  # bounded memory: teacher targets per chunk
                chunk = lows[first : first + _READ_CHUNK]
                child_pixels: list[np.ndarray] = []
                child_where: list[tuple[int, int]] = []  # (row in this chunk, slot)
                for row, k in enumerate(chunk):
                    x0, y0 = (int(v) for v in low["coords"][k])
                    low_tile = slide.read_region(x0, y0, l_mpp, l_size).transpose(2, 0, 1)
                    pixels.append(_normalized(stain, np.ascontiguousarray(low_tile[None]))[0])
                    block = slide.read_region(x0, y0, h_mpp, h_size * ratio)
                    mask = torch.zeros(slots, dtype=torch.bool)
                    att = torch.zeros(slots)
                    for h in np.flatnonzero(high["parent"] == k):
                        slot = int(high["child"][h])
                        r, c = divmod(slot, ratio)
                        child_pixels.append(block[r * h_size : (r + 1) * h_size, c * h_size : (c + 1) * h_size])
                        child_where.append((row, slot))
                        mask[slot] = True
                        if slide_att is not None:
                            att[slot] = slide_att[h]
                    masks.append(mask)
                    attns.append(att)
                    used.append(sf.slide_id)
                    bar.update(1)
                kids = torch.from_numpy(
                    _normalized(stain, np.ascontiguousarray(np.stack(child_pixels).transpose(0, 3, 1, 2)))
                )
                summaries, final = teacher_targets(
                    teacher,
                    kids,
                    layers,
                    device=device,
                    batch_size=cfg.encoder.batch_size,
                    precision=cfg.encoder.precision,
                )
                rows = torch.tensor([r for r, _ in child_where])
                cols = torch.tensor([s for _, s in child_where])
                for layer in layers:
                    dense = torch.zeros(len(chunk), slots, summaries[layer].shape[1], dtype=torch.float16)
                    dense[rows, cols] = summaries[layer].half()
                    children_by_layer[layer].append(dense)
                dense_final = torch.zeros(len(chunk), slots, final.shape[1], dtype=torch.float16)
                dense_final[rows, cols] = final.half()
                finals.append(dense_final)
    bar.close()
    return PatchSet(
        pixels=torch.from_numpy(np.ascontiguousarray(np.stack(pixels))),
        mask=torch.stack(masks),
        children={layer: torch.cat(v) for layer, v in children_by_layer.items()},
        final=torch.cat(finals),
        attention=torch.stack(attns) if attention is not None else None,
        slides=used,
    )


# ---------------------------------------------------------------- training


class Stage1Trainer:
    """The student (a copy of the teacher with the configured parameters trainable), its optimiser and one step."""

    def __init__(
        self, teacher: PatchEncoder, cfg: FinetuneConfig, device: torch.device, seed: int | None = None
    ) -> None:
        """`seed` (default cfg.seed) seeds shuffling and stain jitter; a federated round passes its own."""
        self.cfg = cfg
        self.device = device
        self.layers = teacher.resolve_layers(cfg.layers)
        self.student: PatchEncoder = copy.deepcopy(teacher).cpu()
        self.trainable = configure_trainable(self.student, cfg)
        self.student.checkpoint_layers = cfg.checkpoint_activations
        self.student.to(device)
        params = [p for p in self.student.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"finetune.trainable = {cfg.trainable!r} leaves nothing to train")
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        precision = cfg.encoder.precision
        self.precision = ("bf16" if device.type == "cuda" else "fp32") if precision == "auto" else precision
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16" and device.type == "cuda")
        self.rng = np.random.default_rng(cfg.seed if seed is None else seed)

    def trainable_numel(self) -> int:
        """How many parameter values train."""
        return sum(p.numel() for p in self.student.parameters() if p.requires_grad)

    def step(
        self,
        pixels: Tensor,
        children: dict[int, Tensor],
        final: Tensor,
        mask: Tensor,
        attention: Tensor | None,
    ) -> Stage1Loss:
        """One optimiser step on a batch of 5× patches (stain-jittered when enabled)."""
        cfg = self.cfg
        self.student.train()
        _set_bn_mode(self.student, cfg.update_bn_stats)
        if cfg.stain.enabled:
            pixels = hed_jitter(pixels, self.rng, cfg.stain.sigma, cfg.stain.bias)
        dev = self.device
        x = self.student.normalize(pixels.to(dev, non_blocking=True))
        with autocast_for(dev, self.precision):
            out = self.student.forward_layers(x, self.layers)
        loss = pixel_stage1_loss(
            {layer: out.maps[layer] for layer in self.layers},
            out.embedding,
            {layer: children[layer].to(dev) for layer in self.layers},
            final.to(dev),
            mask.to(dev),
            attention=attention.to(dev) if attention is not None else None,
            use_attention_term=cfg.attention_mode != "off",
            lambda_layer=cfg.lambda_layer,
            lambda_attention=cfg.lambda_attention,
        )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss.total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return Stage1Loss(total=loss.total.detach(), layer=loss.layer.detach(), attention=loss.attention.detach())

    def epoch_batches(self, n: int) -> Iterator[Tensor]:
        """Shuffled index batches over n patches."""
        order = torch.from_numpy(self.rng.permutation(n))
        yield from order.split(self.cfg.batch_size)

    def trainable_arrays(self) -> dict[str, np.ndarray]:
        """The student's trainable parameters by name (what a federated round sends), as float32 copies."""
        return {
            name: p.detach().cpu().float().numpy().copy()
            for name, p in self.student.named_parameters()
            if p.requires_grad
        }

    def load_trainable(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Set the trainable parameters from `arrays`, which must name exactly them with their shapes (the frozen
        ones stay the site's own)."""
        params = {name: p for name, p in self.student.named_parameters() if p.requires_grad}
        if set(arrays) != set(params):
            extra, missing = sorted(set(arrays) - set(params)), sorted(set(params) - set(arrays))
            raise ConfigError(
                f"the encoder arrays received do not name the trainable parameters of finetune.trainable = "
                f"{self.cfg.trainable!r}: extra {extra[:3]}, missing {missing[:3]} (every site must run the same "
                "encoder and finetune settings)"
            )
        with torch.no_grad():
            for name, value in arrays.items():
                param = params[name]
                if tuple(value.shape) != tuple(param.shape):
                    raise ConfigError(
                        f"encoder array {name!r} has shape {tuple(value.shape)}; the parameter has {tuple(param.shape)}"
                    )
                param.copy_(torch.from_numpy(np.asarray(value)).to(param.dtype))

    @torch.no_grad()
    def evaluate(self, patches: PatchSet) -> dict[str, float]:
        """The mean loss terms of the student on the patch set (no stain jitter, BatchNorm in eval mode)."""
        self.student.eval()
        att = patches.attention if self.cfg.attention_mode == "teacher" else None
        sums = {"total": 0.0, "layer": 0.0, "attention": 0.0}
        dev = self.device
        for idx in torch.arange(len(patches)).split(self.cfg.batch_size):
            x = self.student.normalize(patches.pixels[idx].to(dev))
            with autocast_for(dev, self.precision):
                out = self.student.forward_layers(x, self.layers)
            loss = pixel_stage1_loss(
                {layer: out.maps[layer] for layer in self.layers},
                out.embedding,
                {layer: patches.children[layer][idx].to(dev) for layer in self.layers},
                patches.final[idx].to(dev),
                patches.mask[idx].to(dev),
                attention=att[idx].to(dev) if att is not None else None,
                use_attention_term=self.cfg.attention_mode != "off",
                lambda_layer=self.cfg.lambda_layer,
                lambda_attention=self.cfg.lambda_attention,
            )
            for key in sums:
                sums[key] += float(getattr(loss, key)) * len(idx)
        return {k: v / max(len(patches), 1) for k, v in sums.items()}

    def fit(self, patches: PatchSet, epochs: int | None = None) -> list[dict[str, float]]:
        """`epochs` (default cfg.epochs) passes over the patch set; the mean loss terms of each epoch."""
        epochs = self.cfg.epochs if epochs is None else epochs
        history = []
        steps = epochs * -(-len(patches) // self.cfg.batch_size)
        bar = tqdm(total=steps, desc="stage-1 fine-tune", unit="step", disable=not self.cfg.progress)
        att = patches.attention if self.cfg.attention_mode == "teacher" else None
        for epoch in range(epochs):
            sums = {"total": 0.0, "layer": 0.0, "attention": 0.0}
            count = 0
            for idx in self.epoch_batches(len(patches)):
                loss = self.step(
                    patches.pixels[idx],
                    {layer: patches.children[layer][idx] for layer in self.layers},
                    patches.final[idx],
                    patches.mask[idx],
                    att[idx] if att is not None else None,
                )
                for key in sums:
                    sums[key] += float(getattr(loss, key)) * len(idx)
                count += len(idx)
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.total):.4g}")
            history.append({"epoch": epoch, **{k: v / max(count, 1) for k, v in sums.items()}})
            log.info("stage-1 epoch %d: %s", epoch, history[-1])
        bar.close()
        self.student.eval()
        return history


def patch_settings(
    cfg: FinetuneConfig, teacher: PatchEncoder, layers: Sequence[int], stain: dict[str, Any] | None = None
) -> str:
    """Hash of what decides a site's patch set and its targets (sampling, slides' reading and stain
    normalisation, teacher, layers)."""
    payload = cfg.model_dump(
        mode="json",
        include={
            "max_patches",
            "max_patches_per_slide",
            "sample_test_slides",
            "seed",
            "slide",
            "teacher_attention",
            "attention",
        },
    )
    extra = {"stain": stain} if stain and stain.get("method") != "none" else {}  # unchanged hash without it
    return config_hash({**payload, "teacher": teacher.identity(), "layers": list(layers), **extra})


def cached_patches(
    site_dir: Path, cfg: FinetuneConfig, teacher: PatchEncoder, layers: Sequence[int], device: torch.device, cache: Path
) -> PatchSet:
    """`collect_patches`, kept in `cache` (a torch file at the site) and reused while its settings hold."""
    settings = patch_settings(cfg, teacher, layers, site_stain_identity(site_dir, cfg, teacher.name))
    if cache.is_file():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        if saved.get("settings") == settings:
            return PatchSet(
                pixels=saved["pixels"],
                mask=saved["mask"],
                children={int(k): v for k, v in saved["children"].items()},
                final=saved["final"],
                attention=saved["attention"],
                slides=list(saved["slides"]),
            )
    patches = collect_patches(site_dir, cfg, teacher, layers, device)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        torch.save(
            {
                "settings": settings,
                "pixels": patches.pixels,
                "mask": patches.mask,
                "children": {str(k): v for k, v in patches.children.items()},
                "final": patches.final,
                "attention": patches.attention,
                "slides": patches.slides,
            },
            tmp,
        )
    return patches


def save_weights(student: PatchEncoder, path: Path) -> str:
    """Write the student's merged state_dict (the original architecture's keys) atomically; its sha256. The bytes
    depend on the weights only (not on the file's name), so sites holding the same weights hold the same hash."""
    buffer = io.BytesIO()
    torch.save(merged_state(student), buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return sha256_file(path)


# ---------------------------------------------------------------- the site's job


@dataclass
class FinetuneResult:
    """Where the fine-tuned weights are and how they were made."""

    weights: str
    weights_hash: str
    encoder: str
    layers: list[int]
    trainable: str
    trainable_params: int
    patches: int
    slides: int
    history: list[dict[str, float]]
    seconds: float
    settings: str
    skipped: bool = False


def output_dir(site_dir: Path, cfg: FinetuneConfig) -> Path:
    """Folder of the fine-tuned weights and their manifest."""
    return Path(cfg.output) if cfg.output is not None else Path(site_dir) / "finetune"


def settings_hash(cfg: FinetuneConfig, teacher: PatchEncoder, stain: dict[str, Any] | None = None) -> str:
    """Hash of everything that decides the fine-tuned weights (not progress, re-encoding or output), including
    the stain normalisation the site's feature files record (`stain`; none leaves the hash as without it)."""
    payload = cfg.model_dump(mode="json", exclude={"progress", "reencode", "overwrite", "output"})
    payload["encoder"] = teacher.identity()
    if stain and stain.get("method") != "none":
        payload["stain"] = stain
    return config_hash(payload)


def finetune_site(site_dir: Path | str, cfg: FinetuneConfig, teacher: PatchEncoder | None = None) -> FinetuneResult:
    """Fine-tune the site's 5× encoder (skipped when weights with the same settings exist and not overwrite)."""
    site_dir = Path(site_dir)
    t0 = time.perf_counter()
    if cfg.encoder.threads:
        torch.set_num_threads(cfg.encoder.threads)
    device = resolve_device(cfg.encoder.device)
    teacher = (teacher or build_encoder(cfg.encoder)).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    out = output_dir(site_dir, cfg)
    weights, manifest = out / f"{teacher.name}.pt", out / f"{teacher.name}.json"
    settings = settings_hash(cfg, teacher, site_stain_identity(site_dir, cfg, teacher.name))
    if not cfg.overwrite and weights.is_file() and manifest.is_file():
        previous = json.loads(manifest.read_text())
        if previous.get("settings") == settings and previous.get("weights_hash") == sha256_file(weights):
            log.info("%s: fine-tuned weights with these settings exist; skipping (overwrite to redo)", weights)
            return FinetuneResult(**{**previous, "skipped": True})
    trainer = Stage1Trainer(teacher, cfg, device)
    patches = collect_patches(site_dir, cfg, teacher, trainer.layers, device)
    history = trainer.fit(patches)
    weights_hash = save_weights(trainer.student, weights)
    result = FinetuneResult(
        weights=str(weights),
        weights_hash=weights_hash,
        encoder=teacher.name,
        layers=trainer.layers,
        trainable=cfg.trainable,
        trainable_params=trainer.trainable_numel(),
        patches=len(patches),
        slides=len(set(patches.slides)),
        history=history,
        seconds=time.perf_counter() - t0,
        settings=settings,
    )
    with atomic_write(manifest) as fh:
        fh.write(json.dumps(asdict(result), indent=2))
    return result


# ---------------------------------------------------------------- re-encoding


@dataclass
class ReencodeSummary:
    """What re-encoding did to each 5× feature file."""

    weights_hash: str
    features: str = ""  # the features/<name> folder written
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def finetuned_feature_path(site_dir: Path | str, encoder: str, weights_hash: str, slide_id: str) -> Path:
    """`<site>/features/<encoder>-ft-<hash12>/low/<slide_id>.h5`: 5× features of `encoder` fine-tuned to the
    weights whose sha256 is `weights_hash`."""
    return feature_path(site_dir, finetuned_features_name(encoder, weights_hash), "low", slide_id)


def build_finetuned(cfg: FinetuneConfig, weights: Path | str) -> PatchEncoder:
    """The site's encoder architecture with the fine-tuned weights (its weights hash = their sha256)."""
    return build_encoder(cfg.encoder.model_copy(update={"weights": Path(weights)}))


def _reencoded_meta(src: dict[str, Any], encoder: PatchEncoder, chash: str, token_grid: int) -> FeatureMeta:
    fields = set(FeatureMeta.__dataclass_fields__) - {"extra"}
    extra = {k: v for k, v in src.items() if k not in fields and k not in _FILE_KEYS}
    extra.update(
        {
            "encoder_fingerprint": encoder.fingerprint,
            "finetuned_from_weights_hash": str(src.get("encoder_weights_hash", "")),
            "finetuned_from_config_hash": str(src.get("config_hash", "")),
            STAIN_ATTR: json.dumps(stain_identity(src), sort_keys=True),  # the source's, as its patches are re-read
        }
    )
    base = {k: src[k] for k in fields if k in src}
    base.update(
        encoder_name=encoder.name,
        encoder_weights_hash=encoder.weights_hash,
        encoder_dim=encoder.dim,
        config_hash=chash,
        token_grid=token_grid,
    )
    return FeatureMeta(**base, extra=extra)


def reencode_site(
    site_dir: Path | str,
    cfg: FinetuneConfig,
    weights: Path | str,
    encoder: PatchEncoder | None = None,
    *,
    level: Literal["low", "high"] = "low",
    features_name: str | None = None,
) -> ReencodeSummary:
    """Re-encode every complete 5× (or, with `level` = high, 20×) feature file of the site with the fine-tuned
    encoder, on the same grid, into `features/<features_name>/<level>` (default `<encoder>-ft-<hash12>`, named from
    the fine-tuned weights' sha256, so other weights never overwrite these files).

    Resumable: a slide whose target is complete with the same settings (source file's settings, encoder
    identity including the fine-tuned weights hash, token grid) is skipped; a changed hash redoes it.
    """
    site_dir = Path(site_dir)
    t0 = time.perf_counter()
    device = resolve_device(cfg.encoder.device)
    encoder = (encoder or build_finetuned(cfg, weights)).to(device).eval()
    base_name = cfg.encoder.name
    name = features_name if features_name is not None else finetuned_features_name(base_name, encoder.weights_hash)
    summary = ReencodeSummary(weights_hash=encoder.weights_hash, features=name)
    high = level == "high"
    files = _site_files(site_dir, cfg, base_name, need_high=high)
    bar = tqdm(files, desc="re-encode 20×" if high else "re-encode 5×", unit="slide", disable=not cfg.progress)
    for sf in bar:
        source = sf.high if high else sf.low
        arrays, src = _grid_arrays(source, ["coords", "parent", "child"] if high else ["coords"])
        token_grid = int(src.get("token_grid", 0) or 0) if encoder.has_feature_map else 0
        chash = config_hash({"source": src.get("config_hash", ""), "encoder": encoder.identity(), "tokens": token_grid})
        target = feature_path(site_dir, name, level, sf.slide_id)
        if not cfg.overwrite and is_complete(target, chash):
            summary.skipped.append(sf.slide_id)
            continue
        recorded = recorded_preprocess(src)
        if recorded is None:
            raise FeatureFileError(f"{source}: records no tiling settings; rerun `fedslide preprocess`")
        tiling = TilingConfig.model_validate(recorded[1])
        if high:  # the 20× grid read as a grid of its own: cells at the high mpp and patch size
            tiling = tiling.model_copy(update={"low_mpp": tiling.high_mpp, "low_patch_size": tiling.high_patch_size})
        stain = stain_identity(src, source)  # re-read as preprocessing read the source file's patches
        coords = arrays["coords"].astype(np.int64)
        grid = PairedGrid(
            ratio=tiling.ratio,
            low_coords=coords,
            low_size_level0=float(src.get("patch_size_level0_exact", src.get("patch_size_level0", 0))),
            low_tissue=np.zeros(len(coords)),
            high_coords=np.zeros((0, 2), np.int64),
            high_size_level0=0.0,
            high_parent=np.zeros(0, np.int64),
            high_child=np.zeros(0, np.int64),
            high_tissue=np.zeros(0),
        )
        dataset = RegionDataset(
            sf.slide_path,
            cfg.slide.mpp_override,
            cfg.slide.mpp_tolerance,
            grid,
            tiling,
            True,
            False,
            stain=stain_normalizer_from_identity(stain),
        )
        meta = _reencoded_meta(src, encoder, chash, token_grid)
        with FeatureWriter(target, meta, with_parent=high, with_tokens=token_grid > 0) as writer:
            for batch in encode_grid(
                dataset,
                encoder,
                device=device,
                batch_size=cfg.encoder.batch_size,
                num_workers=cfg.encoder.num_workers,
                precision=cfg.encoder.precision,
                token_grid=token_grid,
            ):
                rows = batch.index
                if high:
                    writer.append(
                        batch.features,
                        coords[rows],
                        parent=arrays["parent"][rows],
                        child=arrays["child"][rows],
                        tokens=batch.tokens,
                    )
                else:
                    writer.append(batch.features, coords[rows], tokens=batch.tokens)
        summary.done.append(sf.slide_id)
    bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def run_site(site_dir: Path | str, cfg: FinetuneConfig) -> tuple[FinetuneResult, ReencodeSummary | None]:
    """Fine-tune, then (when cfg.reencode) re-encode the site's 5× features with the result."""
    result = finetune_site(site_dir, cfg)
    reencoded = reencode_site(site_dir, cfg, result.weights) if cfg.reencode else None
    return result, reencoded
