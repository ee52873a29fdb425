"""VIB task-specific fine-tuning of a site's 20× patch encoder, then re-encoding of its feature files.

Stage A trains a `VIBSelector` (common/distillation/vib.py) on the site's frozen 20× features of its train slides.
Stage B keeps each slide's top instances by the selector (the test-time top-k, re-ranked by attention down to
`bag_size`), reads their 20× pixels at the feature files' coordinates, and fine-tunes the encoder end to end with a
gated-ABMIL head on those bags (bag CE; only the selected patches are encoded, forward and backward). The encoder
then re-encodes the site's feature files (the 5× re-encoding path of `client/lowres_finetune.py`, at both levels)
into `features/<encoder>-vib-<hash12>/{high,low}` (named from the fine-tuned weights' sha256), which any MIL model
trains on (`distill --set encoder=<encoder>-vib-<hash12>`). Only the training split's slides and labels are used
(never val or test). Selection stays at the site; a federated round sends the encoder's trainable parameters and the
head (`VIBTrainer.trainable_arrays`) for FedAvg.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from fedslide.client.encoders.base import PatchEncoder, sha256_file
from fedslide.client.encoders.registry import build_encoder
from fedslide.client.encoding import autocast_for
from fedslide.client.lowres_finetune import (
    _grid_arrays,
    _normalized,
    _set_bn_mode,
    _site_files,
    configure_trainable,
    reencode_site,
    save_weights,
)
from fedslide.client.slides import SlideReader
from fedslide.client.stain_augment import hed_jitter
from fedslide.client.stain_normalize import stain_normalizer_from_identity
from fedslide.common.atomic import atomic_write
from fedslide.common.config.base import ConfigError
from fedslide.common.config.finetune import FinetuneConfig
from fedslide.common.config.vib import VIBConfig
from fedslide.common.device import resolve_device
from fedslide.common.distillation.data import load_sites
from fedslide.common.distillation.feature_folders import finetuned_features_name
from fedslide.common.distillation.vib import VIBSelector, select_instances, sparse_bag, vib_loss
from fedslide.common.features import FeatureFileError, config_hash, shared_stain_identity
from fedslide.common.federation import phases as ph
from fedslide.common.models.abmil import ABMIL
from fedslide.common.training.labels import read_labels

log = logging.getLogger(__name__)

ENCODER_PREFIX = ph.ENCODER_PREFIX  # what a federated round sends: encoder.<trainable parameter>, head.<parameter>
HEAD_PREFIX = ph.HEAD_PREFIX


def as_finetune(cfg: VIBConfig) -> FinetuneConfig:
    """The stage-1 config that the shared pieces (trainable parameters, re-encoding) read."""
    return FinetuneConfig(
        trainable=cfg.trainable,
        last_n=cfg.last_n,
        lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        overwrite=cfg.overwrite,
        progress=cfg.progress,
        slide=cfg.slide,
        encoder=cfg.encoder,
    )


# ---------------------------------------------------------------- the site's slides


@dataclass
class SlideBag:
    """One train slide: its frozen 20× features and coords, label index and where its pixels are."""

    slide_id: str
    label: int
    features: Tensor  # [N, D] float32
    coords: np.ndarray  # [N, 2] level-0 top-left
    slide_path: Path
    mpp: float
    size: int
    selected: Tensor | None = None  # indices into the rows, set by stage A
    pixels: Tensor | None = None  # [K, 3, S, S] uint8 of the selected rows


@dataclass
class SiteBags:
    """The site's train slides and its class names."""

    bags: list[SlideBag]
    classes: tuple[str, ...]
    stain: dict[str, object] = field(default_factory=dict)


def train_slide_ids(site_dir: Path, cfg: VIBConfig) -> set[str]:
    """The site's training split (plus its test split with `sample-test-slides`; never its validation split), as a
    federation or `fedslide distill` of this site with seed `vib.seed` carves it: labels.csv's split column or
    `splits.csv`, and a validation split carved from the training slides when none is recorded."""
    data = load_sites([site_dir], cfg.encoder.name, seed=cfg.seed)
    splits = ("train", "test") if cfg.sample_test_slides else ("train",)
    return {data.slides[int(i)].slide_id for name in splits for i in data.split(name)}


def site_bags(
    site_dir: Path, cfg: VIBConfig, classes: Sequence[str] | None = None, slide_ids: Collection[str] | None = None
) -> SiteBags:
    """The slides `slide_ids` (default: `train_slide_ids`, the training split only, so validation labels stay
    unseen) with complete 5× and 20× feature files; label indices follow `classes` (a federation's order) when
    given, else the site's labels.csv."""
    table = read_labels(site_dir / "labels.csv")
    order = tuple(classes) if classes is not None else table.classes
    unknown = sorted({row.label for row in table.rows} - set(order))
    if unknown:
        raise FeatureFileError(f"{site_dir / 'labels.csv'}: labels {unknown} are not among the classes {list(order)}")
    labels = {row.slide_id: order.index(row.label) for row in table.rows}
    kept = set(slide_ids) if slide_ids is not None else train_slide_ids(Path(site_dir), cfg)
    files = _site_files(site_dir, as_finetune(cfg), cfg.encoder.name, need_high=True)
    bags, attrs = [], []
    for sf in files:
        if sf.slide_id not in labels or sf.slide_id not in kept:
            continue
        arrays, meta = _grid_arrays(sf.high, ["coords"])
        with h5py.File(sf.high, "r") as f:
            feats = torch.from_numpy(np.asarray(f["features"][()], dtype=np.float32))
        attrs.append((sf.high, meta))
        bags.append(
            SlideBag(
                sf.slide_id,
                labels[sf.slide_id],
                feats,
                arrays["coords"].astype(np.int64),
                sf.slide_path,
                float(meta["target_mpp"]),
                int(meta["patch_size"]),
            )
        )
    if not bags:
        raise FeatureFileError(f"{site_dir}: no labelled training-split slide has 20× feature files to fine-tune on")
    return SiteBags(bags, order, shared_stain_identity(attrs))


# ---------------------------------------------------------------- stage A: the selector


def train_selector(bags: list[SlideBag], num_classes: int, cfg: VIBConfig, seed: int) -> VIBSelector:
    """The IB selector fitted on the bags' frozen features (one slide per step, shuffled, seeded)."""
    torch.manual_seed(seed)
    dim = int(bags[0].features.shape[1])
    selector = VIBSelector(
        dim, num_classes, cfg.hidden_dim, cfg.attention_dim, cfg.rate, cfg.tau, cfg.samples, cfg.keep
    )
    opt = torch.optim.AdamW(selector.parameters(), lr=cfg.selector_lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(seed)
    selector.train()
    for _ in range(cfg.selector_epochs):
        for i in rng.permutation(len(bags)):
            bag = bags[int(i)]
            loss = vib_loss(selector(bag.features), torch.tensor(bag.label), cfg.bag_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return selector.eval()


def read_selected(bags: list[SlideBag], cfg: VIBConfig, stain: dict[str, object]) -> int:
    """Read the 20× pixels of each bag's selected rows (stain-normalised as preprocessing did); patches read."""
    normalizer = stain_normalizer_from_identity(stain)
    total = 0
    for bag in tqdm(bags, desc="read selected 20×", unit="slide", disable=not cfg.progress):
        assert bag.selected is not None
        with SlideReader(bag.slide_path, cfg.slide.mpp_override, cfg.slide.mpp_tolerance) as slide:
            tiles = [
                slide.read_region(int(x), int(y), bag.mpp, bag.size).transpose(2, 0, 1)
                for x, y in bag.coords[bag.selected.numpy()]
            ]
        bag.pixels = torch.from_numpy(_normalized(normalizer, np.ascontiguousarray(np.stack(tiles))))
        total += len(tiles)
    return total


# ---------------------------------------------------------------- stage B: sparse end-to-end fine-tuning


class VIBTrainer:
    """The encoder copy (configured parameters trainable), the fine-tuning head and their optimiser."""

    def __init__(
        self, encoder: PatchEncoder, num_classes: int, cfg: VIBConfig, device: torch.device, seed: int | None = None
    ) -> None:
        self.cfg = cfg
        self.device = device
        torch.manual_seed(cfg.seed if seed is None else seed)
        self.student: PatchEncoder = copy.deepcopy(encoder).cpu()
        configure_trainable(self.student, as_finetune(cfg))
        self.student.checkpoint_layers = cfg.checkpoint_activations
        self.student.to(device)
        self.head = ABMIL(encoder.dim, num_classes, gated=True).to(device)
        params = [p for p in self.student.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"vib.trainable = {cfg.trainable!r} leaves nothing of the encoder to train")
        self.optimizer = torch.optim.AdamW(
            [{"params": params, "lr": cfg.lr}, {"params": list(self.head.parameters()), "lr": cfg.head_lr}],
            weight_decay=cfg.weight_decay,
        )
        precision = cfg.encoder.precision
        self.precision = ("bf16" if device.type == "cuda" else "fp32") if precision == "auto" else precision
        self.rng = np.random.default_rng(cfg.seed if seed is None else seed)
        self.patches_forward = 0  # patches encoded with gradients (forward and backward) so far
        self._last = self.student.num_layers - 1

    def encode(self, pixels: Tensor) -> Tensor:
        """Pooled embeddings [K, D] of uint8 patches, with gradients, in chunks of `patch_batch`."""
        parts = []
        for chunk in pixels.split(self.cfg.patch_batch):
            x = self.student.normalize(chunk.to(self.device, non_blocking=True))
            with autocast_for(self.device, self.precision):
                parts.append(self.student.forward_layers(x, [self._last]).embedding.float())
        return torch.cat(parts)

    def step(self, pixels: Tensor, label: int) -> float:
        """One optimiser step on one slide's selected patches (bag CE; BatchNorm statistics frozen; HED-jittered when
        `stain.enabled`)."""
        if self.cfg.stain.enabled:
            pixels = hed_jitter(pixels, self.rng, self.cfg.stain.sigma, self.cfg.stain.bias)
        self.student.train()
        _set_bn_mode(self.student, False)
        self.head.train()
        bag = sparse_bag(self.encode, pixels, torch.arange(len(pixels)))
        logits = self.head(bag[None]).logits
        loss = F.cross_entropy(logits.float(), torch.tensor([label], device=logits.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.patches_forward += len(pixels)
        return float(loss.detach())

    def fit(self, bags: list[SlideBag], epochs: int) -> list[dict[str, float]]:
        """`epochs` shuffled passes over the bags' selected patches; the mean bag loss of each."""
        history = []
        for epoch in range(epochs):
            losses = []
            for i in tqdm(self.rng.permutation(len(bags)), desc=f"vib epoch {epoch}", disable=not self.cfg.progress):
                bag = bags[int(i)]
                assert bag.pixels is not None
                losses.append(self.step(bag.pixels, bag.label))
            history.append({"epoch": epoch, "loss": float(np.mean(losses))})
            log.info("vib fine-tune epoch %d: %s", epoch, history[-1])
        self.student.eval()
        self.head.eval()
        return history

    def trainable_arrays(self) -> dict[str, np.ndarray]:
        """What a federated round sends: `encoder.<name>` per trainable encoder parameter and `head.<name>`."""
        out = {
            f"{ENCODER_PREFIX}{n}": p.detach().cpu().float().numpy().copy()
            for n, p in self.student.named_parameters()
            if p.requires_grad
        }
        out.update(
            {f"{HEAD_PREFIX}{n}": p.detach().cpu().float().numpy().copy() for n, p in self.head.named_parameters()}
        )
        return out

    def trainable_numel(self) -> int:
        """Parameter values that train (encoder's trainable ones and the head)."""
        return sum(p.numel() for p in self.student.parameters() if p.requires_grad) + sum(
            p.numel() for p in self.head.parameters()
        )

    def load_trainable(self, arrays: dict[str, np.ndarray]) -> None:
        """Set the trainable encoder parameters and the head from `arrays`, which must name exactly them."""
        params = {f"{ENCODER_PREFIX}{n}": p for n, p in self.student.named_parameters() if p.requires_grad}
        params.update({f"{HEAD_PREFIX}{n}": p for n, p in self.head.named_parameters()})
        if set(arrays) != set(params):
            extra, missing = sorted(set(arrays) - set(params)), sorted(set(params) - set(arrays))
            raise ConfigError(
                f"the VIB arrays received do not name the trainable parameters of vib.trainable = "
                f"{self.cfg.trainable!r}: extra {extra[:3]}, missing {missing[:3]}"
            )
        with torch.no_grad():
            for name, value in arrays.items():
                param = params[name]
                if tuple(value.shape) != tuple(param.shape):
                    raise ConfigError(
                        f"VIB array {name!r} has shape {tuple(value.shape)}; expected {tuple(param.shape)}"
                    )
                param.copy_(torch.from_numpy(np.asarray(value)).to(param.dtype))


def select_site(site: SiteBags, cfg: VIBConfig, seed: int) -> VIBSelector:
    """Stage A at the site, then each bag's selected rows and their pixels (selection never leaves the site)."""
    selector = train_selector(site.bags, len(site.classes), cfg, seed)
    for bag in site.bags:
        bag.selected = select_instances(selector, bag.features, cfg.bag_size)
    read_selected(site.bags, cfg, site.stain)
    return selector


def vib_round(
    site: SiteBags, trainer: VIBTrainer, arrays: dict[str, np.ndarray], epochs: int
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """One federated round at a site: load the global encoder + head, train `epochs` on the local selected bags,
    return the trainable arrays (what FedAvg averages) and counts."""
    trainer.load_trainable(arrays)
    start, before = time.perf_counter(), trainer.patches_forward
    history = trainer.fit(site.bags, epochs)
    return trainer.trainable_arrays(), {
        "num-examples": len(site.bags),
        "train-loss": history[-1]["loss"],
        "patches": trainer.patches_forward - before,
        "seconds": time.perf_counter() - start,
    }


# ---------------------------------------------------------------- the site's job


@dataclass
class VIBResult:
    """Where the VIB-fine-tuned weights are and what they cost."""

    weights: str
    weights_hash: str
    encoder: str
    trainable_params: int
    slides: int
    instances: int  # 20× instances of the train slides (what full fine-tuning would encode per epoch)
    selected: int  # instances fine-tuned through per epoch
    patches_forward_backward: int  # over all epochs
    history: list[dict[str, float]]
    seconds: float
    settings: str
    skipped: bool = False


def output_dir(site_dir: Path, cfg: VIBConfig) -> Path:
    """Folder of the VIB-fine-tuned weights and their manifest."""
    return Path(cfg.output) if cfg.output is not None else Path(site_dir) / "vib"


def vib_finetune_site(site_dir: Path | str, cfg: VIBConfig, encoder: PatchEncoder | None = None) -> VIBResult:
    """Stage A and B at one site (skipped when weights with the same settings exist and not overwrite)."""
    site_dir = Path(site_dir)
    t0 = time.perf_counter()
    if cfg.encoder.threads:
        torch.set_num_threads(cfg.encoder.threads)
    device = resolve_device(cfg.encoder.device)
    encoder = (encoder or build_encoder(cfg.encoder)).eval()
    out = output_dir(site_dir, cfg)
    weights, manifest = out / f"{encoder.name}.pt", out / f"{encoder.name}.json"
    payload = cfg.model_dump(mode="json", exclude={"progress", "reencode", "overwrite", "output", "levels"})
    # "slides": the bags are the training split only (weights made from train + val slides are not reused)
    settings = config_hash({**payload, "encoder": encoder.identity(), "slides": "train-split"})
    if not cfg.overwrite and weights.is_file() and manifest.is_file():
        previous = json.loads(manifest.read_text())
        if previous.get("settings") == settings and previous.get("weights_hash") == sha256_file(weights):
            return VIBResult(**{**previous, "skipped": True})
    site = site_bags(site_dir, cfg)
    select_site(site, cfg, cfg.seed)
    trainer = VIBTrainer(encoder, len(site.classes), cfg, device)
    history = trainer.fit(site.bags, cfg.epochs)
    weights_hash = save_weights(trainer.student, weights)
    result = VIBResult(
        weights=str(weights),
        weights_hash=weights_hash,
        encoder=encoder.name,
        trainable_params=trainer.trainable_numel(),
        slides=len(site.bags),
        instances=sum(len(b.features) for b in site.bags),
        selected=sum(len(b.pixels) for b in site.bags if b.pixels is not None),
        patches_forward_backward=trainer.patches_forward,
        history=history,
        seconds=time.perf_counter() - t0,
        settings=settings,
    )
    with atomic_write(manifest) as fh:
        fh.write(json.dumps(asdict(result), indent=2))
    return result


@dataclass
class VIBReencoded:
    """Where re-encoding wrote (`features/<features>/<level>`) and the slides per level."""

    features: str
    slides: dict[str, int]


def reencode_vib(site_dir: Path | str, cfg: VIBConfig, weights: Path | str) -> VIBReencoded:
    """Re-encode the site's feature files at `cfg.levels` with the VIB-fine-tuned encoder into
    `features/<encoder>-vib-<hash12>` (resumable; a folder per weights hash)."""
    ft = as_finetune(cfg)
    encoder = build_encoder(cfg.encoder.model_copy(update={"weights": Path(weights)}))
    name = finetuned_features_name(cfg.encoder.name, encoder.weights_hash, "vib")
    done: dict[str, int] = {}
    for level in cfg.levels:
        summary = reencode_site(site_dir, ft, weights, encoder, level=level, features_name=name)
        done[level] = len(summary.done) + len(summary.skipped)
    return VIBReencoded(name, done)


def run_vib_site(site_dir: Path | str, cfg: VIBConfig) -> tuple[VIBResult, VIBReencoded | None]:
    """Fine-tune with VIB, then (when cfg.reencode) re-encode the site's feature files with the result."""
    result = vib_finetune_site(site_dir, cfg)
    return result, (reencode_vib(site_dir, cfg, result.weights) if cfg.reencode else None)


__all__ = [
    "VIBReencoded",
    "VIBResult",
    "VIBTrainer",
    "run_vib_site",
    "select_site",
    "site_bags",
    "train_slide_ids",
    "vib_finetune_site",
    "vib_round",
]
