"""The study's clinical-missingness column reads the 5x features of the fold's bundle: a fold that fine-tuned its 5x
encoder reads that encoder's own folder (two folds' folders side by side), and a site without it is refused."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedslide.common.distillation.bundle import BundleMismatchError, StudentBundle
from fedslide.common.distillation.data import SlidePair, load_sites
from fedslide.common.distillation.feature_folders import finetuned_features_name
from fedslide.common.features import feature_path, read_feature_file
from fedslide.deploy.study import clinical_missingness as cm
from tests.feature_sites import D, ENCODER, HASH, make_site, tiny_student_bundle
from tests.test_clinical_predict import HEADER, _clinical_model

H1, H2, H3 = "1" * 64, "2" * 64, "3" * 64
CLASSES = ["neg", "pos"]


def _fold_folder(site: Path, root: Path, weights_hash: str, seed: int) -> str:
    """Another fold's fine-tuned 5x files of the site's slides (other values than the site's own), in their folder."""
    other = make_site(root, site.name, {"train": 2, "val": 2, "test": 2}, seed=seed, weights_hash=weights_hash)
    name = finetuned_features_name(ENCODER, weights_hash)
    (site / "features" / name).mkdir()
    (other / "features" / ENCODER / "low").rename(site / "features" / name / "low")
    return name


def _bundle(low_hash: str, slide: SlidePair) -> StudentBundle:
    """A student bundle of a 5x encoder fine-tuned to `low_hash`, with a BD model as wide as its instances."""
    encoder = SimpleNamespace(name=ENCODER, dim=D, weights_hash=HASH, fingerprint=f"fp-{ENCODER}-{HASH}")
    bundle = tiny_student_bundle(
        encoder, CLASSES, low_encoder_weights_hash=low_hash, low_encoder_fingerprint=f"fp-{ENCODER}-{low_hash}"
    )
    tokens = None if slide.low.tokens is None else torch.from_numpy(slide.low.tokens)
    in_dim = bundle.student_instances(torch.from_numpy(slide.low.features), tokens)[0].shape[-1]
    bundle.clinical = _clinical_model(int(in_dim))
    return bundle


def test_a_fine_tuned_fold_reads_its_own_5x_files_and_a_missing_folder_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = make_site(tmp_path / "cohort", "site1", {"train": 2, "val": 2, "test": 2}, seed=0)
    folders = {h: _fold_folder(site, tmp_path / h[:4], h, seed) for h, seed in ((H1, 5), (H2, 6))}
    slides = load_sites([site]).slides  # as the study reads them: the site's own encoder folder
    with (site / "clinical.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        writer.writerows([[s.slide_id, "70", "20", "3", "positive"] for s in slides])
    for weights_hash in (H1, H2):
        bundle = _bundle(weights_hash, slides[0])
        seen: list[torch.Tensor] = []
        student_instances = bundle.student_instances

        def spy(features: torch.Tensor, tokens: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
            seen.append(features)
            return student_instances(features, tokens)

        monkeypatch.setattr(bundle, "student_instances", spy)
        monkeypatch.setattr(cm, "StudentBundle", SimpleNamespace(load=lambda _dir, b=bundle: b))
        column = cm.clinical_missingness(tmp_path / "bundle", site, slides)
        assert column is not None and column["n"] == len(slides) and column["with_clinical"] == len(slides)
        for slide, features in zip(slides, seen, strict=True):
            own = read_feature_file(feature_path(site, folders[weights_hash], "low", slide.slide_id)).features
            assert np.array_equal(features.numpy(), own)
            assert not np.array_equal(features.numpy(), slide.low.features)
    gone = _bundle(H3, slides[0])  # no folder of those weights at this site: refused, naming the slide and both hashes
    monkeypatch.setattr(cm, "StudentBundle", SimpleNamespace(load=lambda _dir: gone))
    with pytest.raises(BundleMismatchError, match=rf"slide {slides[0].slide_id}: .*{H3[:12]}.*{HASH[:12]}"):
        cm.clinical_missingness(tmp_path / "bundle", site, slides)
