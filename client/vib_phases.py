"""Federated pixel stage 1 with the VIB objective (`pixel-stage1-objective = "vib"`), one site's side.

The phases are pixel stage 1's (init, FedAvg rounds, re-encoding); what travels is the 20× encoder's trainable
parameters (`encoder.<name>`) and the fine-tuning head (`head.<name>`), nothing else. The selector, its selection
and the selected pixels are made once per run at the site (`<run>/pixel_stage1/vib_selection.pt`) and never leave.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord

from fedslide.client.encoders.registry import build_encoder
from fedslide.client.site_run import STAGE1_ENCODER, STAGE1_RECORD, SiteRun
from fedslide.client.vib_finetune import SiteBags, VIBTrainer, reencode_vib, select_site, site_bags
from fedslide.client.lowres_finetune import save_weights
from fedslide.common.atomic import atomic_path, atomic_write
from fedslide.common.config.base import ConfigError
from fedslide.common.device import resolve_device
from fedslide.common.features import config_hash
from fedslide.common.federation import phases as ph

Metrics = dict[str, int | float]
SELECTION = "pixel_stage1/vib_selection.pt"  # the site's selected rows and their 20× pixels (never sent)


def _classes(site: SiteRun) -> tuple[str, ...] | None:
    return tuple(site.facts.classes) if site.facts is not None else None


def train_ids(site: SiteRun) -> set[str]:
    """The site's training-split slides as this run splits them (its validation and test slides never train), plus
    its test slides with `vib.sample-test-slides`."""
    data = site.data()
    splits = ("train", "test") if site.cfg.vib.sample_test_slides else ("train",)
    return {data.slides[int(i)].slide_id for name in splits for i in data.split(name)}


def selected_bags(site: SiteRun, seed: int) -> SiteBags:
    """The site's training-split bags with their selection, made once per run (selector seeded by `seed`) and
    reused."""
    cfg = site.cfg.vib
    bags = site_bags(site.site_dir, cfg, _classes(site), train_ids(site))
    settings = config_hash({"vib": cfg.model_dump(mode="json", exclude={"progress"}), "seed": seed})
    path = site.run_dir / SELECTION
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("settings") == settings and set(saved["slides"]) == {b.slide_id for b in bags.bags}:
            for bag in bags.bags:
                bag.selected, bag.pixels = saved["slides"][bag.slide_id]
            return bags
    select_site(bags, cfg, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"settings": settings, "slides": {b.slide_id: (b.selected, b.pixels) for b in bags.bags}}, tmp)
    return bags


def _trainer(site: SiteRun, num_classes: int, seed: int) -> VIBTrainer:
    cfg = site.cfg.vib
    encoder = build_encoder(cfg.encoder).eval()
    recorded = str(site.data().high_attrs.get("encoder_weights_hash", ""))
    if recorded and recorded != encoder.weights_hash:
        raise ConfigError(
            f"vib.encoder ({encoder.name}, weights {encoder.weights_hash[:12]}) is not the encoder of "
            f"{site.site_dir}/features ({recorded[:12]}): point vib.encoder.weights at the site's encoder"
        )
    return VIBTrainer(encoder, num_classes, cfg, resolve_device(cfg.encoder.device), seed=seed)


def _record(trainer: VIBTrainer) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in trainer.trainable_arrays().items()})


def _load(trainer: VIBTrainer, record: ArrayRecord) -> None:
    trainer.load_trainable({k: v.numpy() for k, v in record.items()})


def _num_classes(site: SiteRun) -> int:
    classes = _classes(site)
    return len(classes) if classes is not None else len(site.data().classes)


def vib_init(site: SiteRun, seed: int) -> tuple[ArrayRecord, Metrics]:
    """The site's initial encoder parameters and head (the server starts from one site's)."""
    site.own_low_features = True
    trainer = _trainer(site, _num_classes(site), seed)
    return _record(trainer), {ph.NUM_EXAMPLES: int(site.split("train").size)}


@torch.no_grad()
def _val_loss(trainer: VIBTrainer, bags: SiteBags) -> float:
    """Mean bag CE of the global encoder + head on the site's selected bags."""
    trainer.student.eval()
    trainer.head.eval()
    losses = []
    for bag in bags.bags:
        assert bag.pixels is not None
        logits = trainer.head(trainer.encode(bag.pixels)[None]).logits
        losses.append(float(F.cross_entropy(logits.float(), torch.tensor([bag.label]))))
    return float(np.mean(losses))


def vib_round(site: SiteRun, record: ArrayRecord, seed: int, round_seed: int) -> tuple[ArrayRecord, Metrics]:
    """Validate the global encoder + head on the site's selected bags, then train them for the local epochs."""
    site.own_low_features = True
    bags = selected_bags(site, seed)
    trainer = _trainer(site, _num_classes(site), round_seed)
    _load(trainer, record)
    metrics: Metrics = {
        ph.NUM_EXAMPLES: len(bags.bags),
        ph.UNIT_WEIGHT: 1,
        ph.VAL_LOSS: _val_loss(trainer, bags),
        ph.VAL_N: len(bags.bags),
    }
    start = time.perf_counter()
    history = trainer.fit(bags.bags, site.cfg.rounds.pixel_stage1_local_epochs)
    metrics.update(
        {ph.TRAIN_LOSS: history[-1]["loss"], ph.EPOCHS: len(history), ph.SECONDS: time.perf_counter() - start}
    )
    return _record(trainer), metrics


def vib_validate(site: SiteRun, record: ArrayRecord, seed: int) -> Metrics:
    """The global encoder + head's loss on the site's selected bags."""
    site.own_low_features = True
    bags = selected_bags(site, seed)
    trainer = _trainer(site, _num_classes(site), seed)
    _load(trainer, record)
    return {ph.NUM_EXAMPLES: len(bags.bags), ph.VAL_LOSS: _val_loss(trainer, bags), ph.VAL_N: len(bags.bags)}


def vib_reencode(site: SiteRun, record: ArrayRecord, seed: int) -> Metrics:
    """Keep the global encoder here (`<run>/pixel_stage1/low_encoder.pt`) and re-encode both levels of the site's
    feature files with it into `features/<encoder>-vib-<hash12>` (a folder per weights hash, so runs never overwrite
    each other's files), which the later phases read."""
    start = time.perf_counter()
    site.own_low_features = True
    trainer = _trainer(site, _num_classes(site), seed)
    _load(trainer, record)
    weights = site.run_dir / STAGE1_ENCODER
    weights_hash = save_weights(trainer.student, weights)
    cfg = site.cfg.vib.model_copy(update={"levels": ["high", "low"]})
    done = reencode_vib(site.site_dir, cfg, weights)
    with atomic_write(site.run_dir / STAGE1_RECORD) as handle:
        json.dump({"weights_hash": weights_hash, "features": done.features, "objective": "vib"}, handle)
    return {
        ph.REENCODED: int(done.slides["low"]),
        ph.NUM_EXAMPLES: int(site.split("train").size),
        ph.SECONDS: time.perf_counter() - start,
    }
